"""PREPROCESS='fast' on CUDA, here on CPU tensors: JPEGs decoded by batch, the rest through the CPU path."""

import io

import lib
import numpy as np
import pytest
import torch
from conftest import TINY_IMAGE_SIZE, embed_params, jpeg_bytes
from PIL import Image

N_PX = TINY_IMAGE_SIZE


def recipe(**options) -> lib.device_jpeg.DeviceJpegRecipe:
    preprocessing = lib.preprocess.Preprocessing(N_PX)
    return lib.device_jpeg.DeviceJpegRecipe(preprocessing, preprocess="fast", device="cpu", **options)


def cpu_fast(data: bytes, rotation: float | None = None, **options) -> np.ndarray:
    fast = lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX), preprocess="fast", **options)
    return fast(data, rotation)


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def rgb_jpeg(seed: int = 0, size: tuple[int, int] = (120, 90)) -> bytes:
    return jpeg_bytes(*size, seed=seed)


def with_orientation(data: bytes, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[lib.device_jpeg.EXIF_ORIENTATION] = orientation
    return encoded(Image.open(io.BytesIO(data)), "JPEG", exif=exif, quality=90)


def test_rgb_jpegs_are_left_to_the_device_and_the_rest_take_the_cpu_path():
    photo = Image.open(io.BytesIO(rgb_jpeg()))
    assert isinstance(recipe()(rgb_jpeg()), lib.device_jpeg.EncodedJpeg)
    for other in (
        encoded(photo.convert("L"), "JPEG"),
        encoded(photo.convert("CMYK"), "JPEG"),
        encoded(photo, "PNG"),
        encoded(photo, "WEBP"),
    ):
        np.testing.assert_array_equal(recipe()(other), cpu_fast(other))


def test_images_to_turn_take_the_cpu_path_and_are_turned():
    turned = with_orientation(rgb_jpeg(), 6)
    assert isinstance(recipe()(turned), lib.device_jpeg.EncodedJpeg)  # EXIF_TRANSPOSE=False: as it is
    np.testing.assert_array_equal(recipe(exif_transpose=True)(turned), cpu_fast(turned, exif_transpose=True))
    assert isinstance(
        recipe(exif_transpose=True)(with_orientation(rgb_jpeg(), 1)), lib.device_jpeg.EncodedJpeg
    )
    np.testing.assert_array_equal(
        recipe(apply_rotation=True)(rgb_jpeg(), 90), cpu_fast(rgb_jpeg(), 90, apply_rotation=True)
    )
    assert isinstance(recipe(apply_rotation=True)(rgb_jpeg(), float("nan")), lib.device_jpeg.EncodedJpeg)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"<html>not found</html>", "not an image"),
        (rgb_jpeg()[:200], "decode: truncated file"),
        (rgb_jpeg(size=(200, 150)), "too many pixels"),
    ],
)
def test_failures_have_the_cpu_path_s_reasons(data, reason):
    with pytest.raises(lib.ImageFailure) as failure:
        recipe(max_pixels=20_000)(data)
    assert failure.value.reason == reason


@pytest.mark.parametrize("per_decode", [64, 3])  # one call, or calls of 3 images
def test_a_batch_is_decoded_and_preprocessed_on_its_device_close_to_exact(per_decode, monkeypatch):
    monkeypatch.setattr(lib.device_jpeg, "IMAGES_PER_DECODE", per_decode)
    photos = [rgb_jpeg(seed, size) for seed, size in enumerate([(120, 90), (90, 120), (120, 90), (64, 64)])]
    pixels, reasons = recipe().stack([recipe()(data) for data in photos])
    assert reasons == [None] * 4 and pixels.shape == (4, 3, N_PX, N_PX) and pixels.dtype == torch.float32
    exact = lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX))
    for image, data in zip(pixels.numpy(), photos, strict=True):
        difference = np.abs(image - exact(data))
        assert difference.mean() < 0.05 and difference.max() < 0.5  # normalised units: 0.05 is 3.4 of 255


def test_a_jpeg_without_its_end_marker_takes_the_cpu_path():
    good = rgb_jpeg(1)
    assert isinstance(recipe()(good + b"\0" * 8), lib.device_jpeg.EncodedJpeg)  # padding after the marker
    np.testing.assert_array_equal(recipe()(good + b"trailer"), cpu_fast(good + b"trailer"))
    with pytest.raises(lib.ImageFailure, match="decode: truncated file"):
        recipe()(good[: len(good) - 100])


def test_a_jpeg_the_device_cannot_decode_takes_the_cpu_path_and_the_rest_stay_on_the_device(monkeypatch):
    calls = []
    decode = lib.device_jpeg._decoded_halves

    def counted(tensors, device):
        calls.append(len(tensors))
        return decode(tensors, device)

    monkeypatch.setattr(lib.device_jpeg, "_decoded_halves", counted)
    photos = [rgb_jpeg(seed) for seed in range(8)]
    header_only = photos[5][: len(photos[5]) // 2]  # a header that promises an RGB JPEG, then too little data
    prepared = [recipe()(data) for data in photos]
    prepared[5] = lib.device_jpeg.EncodedJpeg(header_only)
    pixels, reasons = recipe().stack(prepared)
    assert reasons == [None] * 5 + ["decode: truncated file"] + [None] * 2 and len(pixels) == 7
    assert len(calls) <= 1 + 2 * 3, "halves, not each image alone"
    alone, _ = recipe().stack([recipe()(photos[6])])
    torch.testing.assert_close(pixels[5], alone[0])


def test_a_batch_mixes_device_and_cpu_images_in_their_order():
    photo = Image.open(io.BytesIO(rgb_jpeg(3)))
    png = encoded(photo, "PNG")
    prepared = [recipe()(rgb_jpeg(3)), recipe()(png)]
    pixels, reasons = recipe().stack(prepared)
    assert reasons == [None, None]
    np.testing.assert_array_equal(pixels[1].numpy(), cpu_fast(png))
    assert not torch.equal(pixels[0], pixels[1])  # the JPEG decoded otherwise than the PNG's CPU path


def test_02_s_embedding_runs_the_device_path(table, tiny_encoder):
    params = embed_params(preprocess="fast")
    device_recipe = recipe()
    fetcher = lib.Fetcher()
    with lib.embed.ImageLoader(fetcher, device_recipe, workers=2, lookahead=8) as loader:
        on_device = lib.embed.embed_chunk(table, 0, len(table), tiny_encoder, loader, params.gpu_batch_size)
    cpu_recipe = lib.plan.image_recipe(tiny_encoder, params)
    assert type(cpu_recipe) is lib.preprocess.ImageRecipe  # on the CPU, 'fast' is draft mode
    with lib.embed.ImageLoader(fetcher, cpu_recipe, workers=2, lookahead=8) as loader:
        drafted = lib.embed.embed_chunk(table, 0, len(table), tiny_encoder, loader, params.gpu_batch_size)
    assert on_device.embedded.rows == drafted.embedded.rows and on_device.reasons == drafted.reasons
    cosines = np.sum(on_device.embeddings() * drafted.embeddings(), axis=1)
    assert cosines.min() > 0.99


def test_the_device_path_is_recorded_as_its_own_preprocessing():
    described = recipe().describe()
    assert described["preprocess"] == "fast"
    assert described["preprocessing"] == lib.device_jpeg.DEVICE_PREPROCESSING_RULE
