"""The model: checkpoints by name, hub id or directory; embeddings equal a direct CLIPModel forward."""

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import lib
import numpy as np
import pytest
import torch
from conftest import FAKE_COMMIT, TINY_IMAGE_SIZE, closed_port_url, jpeg_bytes
from PIL import Image
from reference import reference_embeddings


def test_a_local_directory_is_identified_by_its_weights(tiny_checkpoint, tmp_path):
    checkpoint = lib.model.resolve_checkpoint(str(tiny_checkpoint))
    assert checkpoint.path == tiny_checkpoint and checkpoint.revision.startswith("sha256:")
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    assert lib.model.resolve_checkpoint(str(copy)).revision == checkpoint.revision


def test_openai_names_map_to_the_hub_and_work_offline_from_the_cache(offline_hub):
    checkpoint = lib.model.resolve_checkpoint("ViT-B/32")
    assert checkpoint.model_id == "openai/clip-vit-base-patch32"
    assert checkpoint.revision == FAKE_COMMIT
    encoder = lib.load_encoder("ViT-B/32", "cpu", "auto")
    assert encoder.embedding_size == 16 and encoder.preprocessing.image_size == TINY_IMAGE_SIZE
    assert encoder.precision == "fp32"


def test_a_cached_model_works_when_the_hub_is_unreachable(hub_cache, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed_port_url(""))
    assert lib.model.resolve_checkpoint("ViT-B/32").revision == FAKE_COMMIT
    with pytest.raises(lib.PipelineError, match=r"could not be reached .*Connection refused"):
        lib.model.resolve_checkpoint("ViT-L/14")


def test_a_revision_pin_resolves_offline_from_the_cache(offline_hub):
    assert lib.model.resolve_checkpoint("ViT-B/32", FAKE_COMMIT).revision == FAKE_COMMIT
    assert lib.model.resolve_checkpoint("openai/clip-vit-base-patch32", "main").revision == FAKE_COMMIT
    encoder = lib.load_encoder("ViT-B/32", "cpu", "fp32", revision=FAKE_COMMIT)
    assert encoder.checkpoint.revision == FAKE_COMMIT


def test_a_revision_missing_from_an_unreachable_hub_names_it(offline_hub):
    with pytest.raises(lib.PipelineError) as error:
        lib.model.resolve_checkpoint("ViT-B/32", "v2.0")
    message = str(error.value)
    assert "'openai/clip-vit-base-patch32' at revision 'v2.0'" in message
    assert "--revision v2.0" in message


def test_a_revision_pin_on_a_local_directory_is_a_parameter_error(tiny_checkpoint):
    with pytest.raises(lib.ParameterError, match=r"MODEL_REVISION='v1' applies to hub models"):
        lib.model.resolve_checkpoint(str(tiny_checkpoint), "v1")


def test_a_model_missing_from_an_unreachable_hub_says_how_to_work_offline(offline_hub):
    with pytest.raises(lib.PipelineError) as error:
        lib.load_encoder("ViT-L/14", "cpu")
    message = str(error.value)
    assert "Could not get the model 'openai/clip-vit-large-patch14'" in message
    assert "HF_HUB_CACHE" in message and "local directory" in message


def test_missing_directory(tmp_path):
    with pytest.raises(lib.PipelineError, match=r"MODEL='.*nope': .*nope does not exist. Give an OpenAI .pt"):
        lib.load_encoder(str(tmp_path / "nope"), "cpu")


def test_a_non_clip_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "bert")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(lib.PipelineError, match="is not a CLIP checkpoint: .*model_type='bert'"):
        lib.load_encoder(str(folder), "cpu")


def test_a_checkpoint_without_weights_is_refused(tiny_checkpoint, tmp_path):
    folder = shutil.copytree(
        tiny_checkpoint, tmp_path / "empty", ignore=shutil.ignore_patterns("*.safetensors")
    )
    with pytest.raises(lib.PipelineError, match="holds no weights"):
        lib.load_encoder(str(folder), "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_parameter_error():
    with pytest.raises(lib.ParameterError, match=r"DEVICE='cuda' is not available: .*Use DEVICE='cpu'"):
        lib.model.resolve_device("cuda")


def test_auto_device_and_precision():
    assert lib.model.resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert lib.model.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert lib.model.resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_preprocessing_comes_from_the_checkpoint(tiny_checkpoint, tmp_path):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "other-stats")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.2, 0.3, 0.4])
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    encoder = lib.load_encoder(str(folder), "cpu")
    assert encoder.preprocessing == lib.preprocess.Preprocessing(
        TINY_IMAGE_SIZE, (0.5, 0.5, 0.5), (0.2, 0.3, 0.4)
    )


def sample_images(count: int) -> list[Image.Image]:
    import io

    shapes = [(64, 48), (48, 64), (32, 32), (160, 32), (20, 15)]
    return [Image.open(io.BytesIO(jpeg_bytes(*shapes[i % 5], seed=100 + i))) for i in range(count)]


def test_embeddings_equal_a_direct_clip_forward(tiny_encoder):
    images = sample_images(12)
    expected = reference_embeddings(
        tiny_encoder.model, images, TINY_IMAGE_SIZE, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD
    )
    ours = tiny_encoder.encode(np.stack([tiny_encoder.preprocessing(image) for image in images]))
    assert ours.dtype == np.float32 and ours.shape == (12, 16)
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-6)


def test_a_vector_does_not_depend_on_its_batch(tiny_encoder):
    pixels = np.stack([tiny_encoder.preprocessing(image) for image in sample_images(9)])
    whole = tiny_encoder.encode(pixels)
    in_pieces = np.concatenate([tiny_encoder.encode(pixels[i : i + 4]) for i in range(0, 9, 4)])
    alone = np.concatenate([tiny_encoder.encode(pixels[i : i + 1]) for i in range(9)])
    np.testing.assert_allclose(in_pieces, whole, atol=1e-6)
    np.testing.assert_allclose(alone, whole, atol=1e-6)


def test_bf16_vectors_are_stored_as_normalised_float32(tiny_checkpoint):
    encoder = lib.load_encoder(str(tiny_checkpoint), "cpu", "bf16")
    vectors = encoder.encode(np.stack([encoder.preprocessing(image) for image in sample_images(3)]))
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    assert encoder.signature()["precision"] == "bf16"


def test_image_size_and_embedding_size_come_from_the_checkpoint(tmp_path):
    """A 48-pixel checkpoint with 8-d embeddings, as a 336-pixel one differs from ViT-B/32."""
    from transformers import CLIPConfig, CLIPModel

    layers = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config=layers, vision_config={**layers, "image_size": 48, "patch_size": 16}, projection_dim=8
    )
    torch.manual_seed(1)
    CLIPModel(config).save_pretrained(tmp_path)
    encoder = lib.load_encoder(str(tmp_path), "cpu", "fp32")
    assert encoder.preprocessing == lib.preprocess.Preprocessing(48) and encoder.embedding_size == 8
    images = sample_images(4)
    expected = reference_embeddings(
        encoder.model, images, 48, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD
    )
    ours = encoder.encode(np.stack([encoder.preprocessing(image) for image in images]))
    np.testing.assert_allclose(ours, expected, atol=1e-6)


QUERIES = ["a dog", "two cats on a red sofa", "x" * 300]


def test_text_embeddings_equal_a_direct_clip_forward(tiny_encoder):
    tokens = tiny_encoder.tokenizer(
        QUERIES, padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        features = tiny_encoder.model.get_text_features(**tokens).pooler_output
    expected = (features / features.norm(dim=-1, keepdim=True)).numpy()
    ours = tiny_encoder.encode_text(QUERIES)
    assert ours.dtype == np.float32 and ours.shape == (3, 16)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_long_texts_are_truncated_to_the_context_length_keeping_the_end_token(tiny_encoder):
    assert tiny_encoder.context_length == 77
    ids = tiny_encoder.tokenizer(QUERIES[2:], truncation=True, max_length=77)["input_ids"][0]
    assert len(ids) == 77 and ids[-1] == tiny_encoder.tokenizer.eos_token_id


def test_a_text_vector_does_not_depend_on_its_batch(tiny_encoder):
    together = tiny_encoder.encode_text(QUERIES, batch_size=2)
    alone = np.concatenate([tiny_encoder.encode_text([query]) for query in QUERIES])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    assert tiny_encoder.encode_text([]).shape == (0, 16)
    np.testing.assert_array_equal(tiny_encoder.encode_text(QUERIES[0]), alone[:1])


def test_a_checkpoint_without_tokenizer_files_cannot_embed_text(tiny_checkpoint, tmp_path):
    folder = shutil.copytree(
        tiny_checkpoint,
        tmp_path / "no-tokenizer",
        ignore=shutil.ignore_patterns("vocab.json", "merges.txt", "tokenizer*", "special_tokens_map.json"),
    )
    encoder = lib.load_encoder(str(folder), "cpu", "fp32")
    with pytest.raises(lib.PipelineError, match="text embeddings need its tokenizer files"):
        encoder.encode_text(["a dog"])


def test_out_of_memory_halves_the_batch_warns_once_and_gives_the_same_vectors(tiny_checkpoint, monkeypatch):
    encoder = lib.load_encoder(str(tiny_checkpoint), "cpu", "fp32")
    pixels = np.stack([encoder.preprocessing(image) for image in sample_images(9)])
    expected = encoder.encode(pixels)
    forward = encoder._launch

    def fits_four(batch):
        if len(batch) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(batch)

    monkeypatch.setattr(encoder, "_launch", fits_four)
    with pytest.warns(UserWarning, match="ran out of memory on a batch of 9 images") as warned:
        np.testing.assert_allclose(encoder.encode(pixels), expected, atol=1e-6)
        np.testing.assert_allclose(encoder.encode(pixels), expected, atol=1e-6)
    assert len(warned) == 1 and encoder.batch_limit == 3


def test_out_of_memory_on_one_image_is_a_clear_error(tiny_checkpoint, monkeypatch):
    encoder = lib.load_encoder(str(tiny_checkpoint), "cpu", "fp32")

    def never_fits(batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(encoder, "_launch", never_fits)
    pixels = np.stack([encoder.preprocessing(image) for image in sample_images(2)])
    with pytest.warns(UserWarning), pytest.raises(lib.PipelineError, match="out of memory on a single image"):
        encoder.encode(pixels)


PAGE_FAULTS_OF_BIG_TENSORS = """
import resource, sys
import torch
sys.path.insert(0, sys.argv[1])
import lib
if sys.argv[2] != "-":
    lib.load_encoder(sys.argv[2], "cpu", "fp32")
for _ in range(3):  # 64 MB tensors, made and freed as the model's activations are
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(16 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_of_big_tensors(checkpoint: str) -> int:
    """Page faults of five 64 MB tensors made after three others, in a fresh process."""
    notebooks = str(Path(lib.__file__).parent.parent)
    command = [sys.executable, "-c", PAGE_FAULTS_OF_BIG_TENSORS, notebooks, checkpoint]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt, on Linux")
def test_a_cpu_encoder_keeps_freed_memory_rather_than_fault_it_in_again(tiny_checkpoint):
    default = page_faults_of_big_tensors("-")
    assert default > 5 * (64 << 20) // resource.getpagesize() // 2  # glibc maps and unmaps each one
    assert page_faults_of_big_tensors(str(tiny_checkpoint)) < default / 10
