"""The benchmark scripts' building blocks, on the tiny model, so the scripts keep working."""

import io

import numpy as np
from PIL import Image
from precision import precision_agreement
from workload import synthetic_jpeg


def test_synthetic_photos_are_open_images_sized_jpegs():
    image = Image.open(io.BytesIO(synthetic_jpeg(seed=3)))
    assert image.format == "JPEG" and image.size == (1024, 768) and image.mode == "RGB"
    assert synthetic_jpeg(seed=3) == synthetic_jpeg(seed=3) != synthetic_jpeg(seed=4)
    assert np.asarray(image).std() > 10, "not a flat image"


def test_precision_agreement_reports_cosines_with_fp32(tiny_checkpoint):
    report = precision_agreement(str(tiny_checkpoint), "cpu", 6, ["bf16"], batch_size=4)
    assert report["images"] == 6 and report["device"] == "cpu"
    bf16 = report["precisions"]["bf16"]
    assert 0.99 < bf16["min_cosine"] <= bf16["mean_cosine"] <= 1.0
