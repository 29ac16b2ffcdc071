"""Encode: checkpoints by name, hub id or directory; embeddings equal a direct CLIPModel forward."""

import json
import shutil

import lib
import numpy as np
import pytest
import torch
from conftest import FAKE_COMMIT, TINY_IMAGE_SIZE, jpeg_bytes
from PIL import Image
from reference import reference_embeddings


def test_a_local_directory_is_identified_by_its_weights(tiny_checkpoint, tmp_path):
    checkpoint = lib.resolve_checkpoint(str(tiny_checkpoint))
    assert checkpoint.path == tiny_checkpoint and checkpoint.revision.startswith("sha256:")
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    assert lib.resolve_checkpoint(str(copy)).revision == checkpoint.revision


def test_openai_names_map_to_the_hub_and_work_offline_from_the_cache(offline_hub):
    checkpoint = lib.resolve_checkpoint("ViT-B/32")
    assert checkpoint.model_id == "openai/clip-vit-base-patch32"
    assert checkpoint.revision == FAKE_COMMIT
    encoder = lib.load_encoder("ViT-B/32", "cpu", "auto")
    assert encoder.embedding_size == 16 and encoder.preprocessing.image_size == TINY_IMAGE_SIZE
    assert encoder.precision == "fp32"


def test_a_model_missing_from_an_unreachable_hub_says_how_to_work_offline(offline_hub):
    with pytest.raises(lib.PipelineError) as error:
        lib.load_encoder("ViT-L/14", "cpu")
    message = str(error.value)
    assert "Could not get the model 'openai/clip-vit-large-patch14'" in message
    assert "HF_HUB_CACHE" in message and "local directory" in message


def test_missing_directory(tmp_path):
    with pytest.raises(lib.PipelineError, match="the directory .*nope does not exist"):
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
        lib.resolve_device("cuda")


def test_auto_device_and_precision():
    assert lib.resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert lib.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert lib.resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_preprocessing_comes_from_the_checkpoint(tiny_checkpoint, tmp_path):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "other-stats")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.2, 0.3, 0.4])
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    encoder = lib.load_encoder(str(folder), "cpu")
    assert encoder.preprocessing == lib.Preprocessing(TINY_IMAGE_SIZE, (0.5, 0.5, 0.5), (0.2, 0.3, 0.4))


def sample_images(count: int) -> list[Image.Image]:
    import io

    shapes = [(64, 48), (48, 64), (32, 32), (160, 32), (20, 15)]
    return [Image.open(io.BytesIO(jpeg_bytes(*shapes[i % 5], seed=100 + i))) for i in range(count)]


def test_embeddings_equal_a_direct_clip_forward(tiny_encoder):
    images = sample_images(12)
    expected = reference_embeddings(
        tiny_encoder.model, images, TINY_IMAGE_SIZE, lib.OPENAI_MEAN, lib.OPENAI_STD
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
