"""PRECISION='int8': the image tower exported to ONNX once per weights, quantised, run by ONNX Runtime."""

import shutil

import lib
import numpy as np
import pytest
import torch
from conftest import TINY_IMAGE_SIZE, read_output, run_embed, run_signature
from test_model import sample_images


def pixels_of(encoder, count: int = 12) -> np.ndarray:
    return np.stack([encoder.preprocessing(image) for image in sample_images(count)])


@pytest.fixture
def int8_encoder(workspace, tiny_checkpoint) -> lib.model.ClipEncoder:
    return lib.load_encoder(str(tiny_checkpoint), "cpu", "int8")


def test_int8_embeds_through_onnx_runtime_close_to_fp32(int8_encoder, tiny_encoder):
    assert int8_encoder.runtime.startswith("onnxruntime ") and int8_encoder.precision == "int8"
    pixels = pixels_of(int8_encoder)
    vectors = int8_encoder.encode(pixels)
    assert vectors.dtype == np.float32 and vectors.shape == (12, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    cosines = np.sum(vectors * tiny_encoder.encode(pixels), axis=1)
    assert cosines.min() > 0.98
    assert not np.array_equal(vectors, tiny_encoder.encode(pixels)), "int8 computes otherwise than fp32"
    np.testing.assert_allclose(int8_encoder.encode(pixels[:5]), vectors[:5], atol=1e-6)  # batch-independent


def test_texts_stay_in_float32_with_torch(int8_encoder, tiny_encoder):
    np.testing.assert_allclose(
        int8_encoder.encode_text(["a dog", "a cat"]), tiny_encoder.encode_text(["a dog", "a cat"]), atol=1e-6
    )


def test_the_fp32_export_equals_torch(int8_encoder, tiny_encoder):
    exported = lib.onnx_tower.tower_file(int8_encoder.checkpoint.revision, "fp32")
    tower = lib.onnx_tower.OnnxImageTower(exported, threads=2)
    features = torch.from_numpy(tower(pixels_of(tiny_encoder)))
    np.testing.assert_allclose(
        lib.model._normalised(features).numpy(), tiny_encoder.encode(pixels_of(tiny_encoder)), atol=1e-6
    )


def test_the_export_is_made_once_per_weights(workspace, tiny_checkpoint, tmp_path, capsys):
    lib.load_encoder(str(tiny_checkpoint), "cpu", "int8")
    assert "Exporting the image tower to ONNX" in capsys.readouterr().out
    digest = lib.model.resolve_checkpoint(str(tiny_checkpoint)).revision
    quantised = lib.onnx_tower.tower_file(digest, "int8")
    made = quantised.stat().st_mtime_ns
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "same-weights")
    again = lib.load_encoder(str(copy), "cpu", "int8")
    assert "Exporting" not in capsys.readouterr().out and quantised.stat().st_mtime_ns == made
    assert "model" not in vars(again), "the torch model is not loaded for images on ONNX Runtime"
    assert again.encode(pixels_of(again, 2)).shape == (2, 16) and "model" not in vars(again)
    assert again.encode_text("a dog").shape == (1, 16) and "model" in vars(again)  # texts load it
    assert sorted(path.name for path in quantised.parent.iterdir()) == ["image-fp32.onnx", "image-int8.onnx"]


def test_a_hub_model_is_keyed_by_its_weights_digest(workspace, offline_hub, tiny_checkpoint):
    encoder = lib.load_encoder("ViT-B/32", "cpu", "int8")
    local = lib.model.resolve_checkpoint(str(tiny_checkpoint))
    assert lib.model.weights_digest(encoder.checkpoint) == local.revision  # the hub holds the same weights
    assert lib.onnx_tower.tower_file(local.revision, "int8").is_file()


def test_int8_on_a_gpu_is_a_parameter_error():
    with pytest.raises(lib.ParameterError, match=r"PRECISION='int8' runs on the CPU .*DEVICE='cpu'"):
        lib.model.resolve_precision("int8", torch.device("cuda"))


def test_a_damaged_cached_tower_is_named(workspace, tiny_checkpoint):
    digest = lib.model.resolve_checkpoint(str(tiny_checkpoint)).revision
    damaged = lib.onnx_tower.tower_file(digest, "int8")
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a model")
    with pytest.raises(lib.PipelineError, match=rf"{damaged} cannot be loaded by ONNX Runtime .*delete it"):
        lib.load_encoder(str(tiny_checkpoint), "cpu", "int8")


def test_an_export_that_fails_leaves_nothing_and_names_the_way_out(workspace, tiny_checkpoint, monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("an operator ONNX lacks")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(
        lib.PipelineError,
        match=r"could not be exported to ONNX \(RuntimeError: an operator ONNX lacks\).*"
        r"Use PRECISION='fp32'",
    ):
        lib.load_encoder(str(tiny_checkpoint), "cpu", "int8")
    assert not any((workspace.cache / "onnx").rglob("*.onnx*"))


def test_an_export_that_differs_from_torch_is_not_used(workspace, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(lib.onnx_tower, "EXPORT_TOLERANCE", 0.0)  # no export is exact to 0
    with pytest.raises(lib.PipelineError, match=r"differs from torch by .* it is not used"):
        lib.load_encoder(str(tiny_checkpoint), "cpu", "int8")
    assert not any((workspace.cache / "onnx").rglob("*.onnx*"))


def test_02_in_int8_records_its_runtime_and_never_mixes_with_fp32(
    collection, table, int8_encoder, tiny_encoder
):
    run_embed(table, int8_encoder, precision="int8", end=8)
    chunk = read_output(collection.chunks / "chunk_000000000_000000008.h5")
    assert chunk["attrs"]["precision"] == "int8" and chunk["attrs"]["runtime"].startswith("onnxruntime ")
    assert chunk["embeddings"].shape == (8, 16) and chunk["attrs"]["image_size"] == TINY_IMAGE_SIZE
    with pytest.raises(lib.PipelineError, match=r"PRECISION: 'int8' recorded, 'fp32' requested"):
        lib.plan.plan_chunks(collection, 0, None, 8, run_signature(tiny_encoder, table), len(table))
