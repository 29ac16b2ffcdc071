"""GPU checks, run with `pytest -m gpu` on a machine with CUDA; skipped elsewhere.

They use a randomly initialised model of ViT-B/32's shape (benchmarks/workload.py), since the tests
never download weights, and print the figures they measure (`pytest -m gpu -s` shows them).
"""

import dataclasses
import json
import shutil

import lib
import numpy as np
import pytest
import torch
from conftest import read_output, run_embed
from precision import encode_all, precision_agreement, preprocessed
from workload import random_clip, synthetic_images

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def vit_b_32(tmp_path_factory) -> str:
    return str(random_clip("random-vit-b-32", tmp_path_factory.mktemp("models")))


def test_fp16_and_bf16_agree_with_fp32(vit_b_32):
    report = precision_agreement(vit_b_32, "cuda", 300, ["fp16", "bf16"])
    print(json.dumps(report, indent=1))
    assert report["precisions"]["fp16"]["min_cosine"] >= 0.999
    assert report["precisions"]["bf16"]["min_cosine"] >= 0.99


def test_auto_precision_on_cuda_is_fp16_and_vectors_are_float32(vit_b_32):
    encoder = lib.load_encoder(vit_b_32, "cuda", "auto")
    assert encoder.precision == "fp16" and next(encoder.model.parameters()).dtype == torch.float16
    vectors = encoder.encode(preprocessed(4, encoder.preprocessing))
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)


def test_fp32_on_cuda_agrees_with_fp32_on_the_cpu(vit_b_32):
    on_gpu, on_cpu = (lib.load_encoder(vit_b_32, device, "fp32") for device in ("cuda", "cpu"))
    pixels = preprocessed(64, on_cpu.preprocessing)
    cosines = np.sum(encode_all(on_gpu, pixels, 16) * encode_all(on_cpu, pixels, 16), axis=1)
    print(f"cuda fp32 vs cpu fp32: min cosine {cosines.min():.7f}")
    assert cosines.min() >= 0.9999


def test_a_vector_on_cuda_does_not_depend_on_its_batch(vit_b_32):
    encoder = lib.load_encoder(vit_b_32, "cuda", "fp16")
    pixels = preprocessed(33, encoder.preprocessing)
    whole, alone = encode_all(encoder, pixels, 33), encode_all(encoder, pixels, 1)
    cosines = np.sum(whole * alone, axis=1)
    print(f"cuda fp16, batch of 33 vs batches of 1: min cosine {cosines.min():.7f}")
    assert cosines.min() >= 0.9999


def test_02_on_cuda_records_its_device_and_precision(collection, table, tiny_checkpoint):
    encoder = lib.load_encoder(str(tiny_checkpoint), "cuda", "auto")
    run_embed(table, encoder, device="cuda", precision="auto")
    attrs = read_output(lib.find_chunks(collection.chunks)[0].path)["attrs"]
    assert attrs["device"] == "cuda" and attrs["precision"] == "fp16"


def test_the_auto_batch_on_cuda_fits_the_gpu(vit_b_32):
    encoder = lib.load_encoder(vit_b_32, "cuda", "auto")
    batch = lib.plan.cuda_batch_size(encoder)
    print(f"GPU_BATCH_SIZE='auto' on {torch.cuda.get_device_name()}: {batch}")
    assert batch & (batch - 1) == 0 and 64 <= batch <= lib.plan.CUDA_BATCH_LIMIT
    encoder.encode(preprocessed(batch, encoder.preprocessing))
    assert encoder.batch_limit is None, "the batch ran whole, without halving for memory"


def test_fast_on_cuda_decodes_jpegs_on_the_gpu_and_agrees_with_exact(collection, table, tiny_checkpoint):
    encoder = lib.load_encoder(str(tiny_checkpoint), "cuda", "fp32")
    run_embed(table, encoder, device="cuda", precision="fp32", preprocess="fast")
    fast = read_output(lib.find_chunks(collection.chunks)[0].path)
    assert fast["attrs"]["preprocessing"] == lib.device_jpeg.DEVICE_PREPROCESSING_RULE
    shutil.rmtree(collection.chunks)
    run_embed(table, encoder, device="cuda", precision="fp32", preprocess="exact")
    exact = read_output(lib.find_chunks(collection.chunks)[0].path)
    assert fast["rows"] == exact["rows"] and fast["reasons"] == exact["reasons"]
    cosines = np.sum(fast["embeddings"] * exact["embeddings"], axis=1)
    print(f"fast on cuda vs exact: min cosine {cosines.min():.6f}")
    assert cosines.min() >= 0.99


def test_the_device_decoder_matches_the_cpu_decoder_on_photos():
    photos = synthetic_images(16)
    recipe = lib.device_jpeg.DeviceJpegRecipe(lib.preprocess.Preprocessing(224), preprocess="fast")
    on_gpu, reasons = recipe.stack([recipe(data) for data in photos])
    on_cpu, _ = dataclasses.replace(recipe, device="cpu").stack([recipe(data) for data in photos])
    assert reasons == [None] * 16 and on_gpu.device.type == "cuda"
    difference = (on_gpu.cpu() - on_cpu).abs()
    print(f"nvJPEG vs libjpeg, preprocessed: mean {difference.mean():.4f}, max {difference.max():.4f}")
    assert difference.mean() < 0.02
