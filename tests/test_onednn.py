"""fp32 on the CPU: Linear layers through oneDNN agree with torch's own to float32 rounding."""

import lib
import numpy as np
import pytest
import torch


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24)])
def test_a_onednn_linear_computes_what_nn_linear_does(bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=bias)
    features = torch.randn(*shape)
    with torch.inference_mode():
        torch.testing.assert_close(
            lib.onednn.OneDnnLinear(linear)(features), linear(features), rtol=1e-5, atol=1e-6
        )


def test_every_linear_of_clip_is_replaced_and_its_vectors_agree(tiny_checkpoint):
    from transformers import CLIPModel

    plain = CLIPModel.from_pretrained(tiny_checkpoint).eval()
    onednn = lib.onednn.with_onednn_linears(CLIPModel.from_pretrained(tiny_checkpoint).eval())
    assert not any(isinstance(module, torch.nn.Linear) for module in onednn.modules())
    assert any(isinstance(module, lib.onednn.OneDnnLinear) for module in onednn.modules())
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(2))

    def vectors(model, get_features, inputs):
        with torch.inference_mode():
            return lib.model._normalised(getattr(model, get_features)(**inputs).pooler_output).numpy()

    for get_features, inputs in (
        ("get_image_features", {"pixel_values": pixels}),
        ("get_text_features", {"input_ids": ids}),
    ):
        np.testing.assert_allclose(
            vectors(onednn, get_features, inputs), vectors(plain, get_features, inputs), atol=1e-6
        )


def test_only_fp32_on_the_cpu_uses_onednn(tiny_encoder):
    assert lib.onednn.uses_onednn(torch.device("cpu"), torch.float32)
    assert not lib.onednn.uses_onednn(torch.device("cpu"), torch.bfloat16)
    assert not lib.onednn.uses_onednn(torch.device("cuda"), torch.float32)
    assert tiny_encoder.runtime == f"torch {torch.__version__}, Linear layers on oneDNN"
