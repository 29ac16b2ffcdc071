"""Decode and preprocess: OpenAI CLIP's transform reproduced exactly, failures named."""

import io

import lib
import numpy as np
import pytest
from conftest import jpeg_bytes
from PIL import Image
from reference import openai_preprocess

N_PX = 32
SIZES = [
    (32, 32),  # exactly n_px: no resample
    (32, 90),  # short side already n_px, portrait
    (90, 32),  # short side already n_px, landscape
    (33, 35),  # crop offsets where floor and round differ
    (35, 33),
    (20, 15),  # smaller than n_px: upscaled
    (15, 20),
    (200, 40),  # 5:1
    (40, 200),  # 1:5
    (641, 479),
    (1, 1),
]


def pil_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image.convert(mode)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_equals_the_reference_bit_for_bit(width, height):
    image = pil_image(width, height, seed=width * 1000 + height)
    ours = lib.Preprocessing(N_PX)(image)
    reference = openai_preprocess(image, N_PX, lib.OPENAI_MEAN, lib.OPENAI_STD).numpy()
    assert ours.dtype == np.float32 and ours.shape == (3, N_PX, N_PX)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "PA", "RGBA", "CMYK", "1"])
def test_every_8bit_mode_equals_the_reference(mode):
    image = pil_image(47, 61, mode=mode, seed=3)
    ours = lib.Preprocessing(N_PX)(image)
    reference = openai_preprocess(image, N_PX, lib.OPENAI_MEAN, lib.OPENAI_STD).numpy()
    np.testing.assert_array_equal(ours, reference)


def test_a_336_pixel_checkpoint_and_its_own_mean_and_std():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)
    image = pil_image(500, 377, seed=7)
    ours = lib.Preprocessing(336, mean, std)(image)
    np.testing.assert_array_equal(ours, openai_preprocess(image, 336, mean, std).numpy())


@pytest.mark.parametrize(("width", "first_column"), [(33, 0), (34, 1), (35, 2), (37, 2), (39, 4)])
def test_center_crop_rounds_half_to_even_like_torchvision(width, first_column):
    """Columns numbered by value: the crop keeps columns from int(round((W - n_px) / 2))."""
    columns = np.tile(np.arange(width, dtype=np.uint8), (N_PX, 1))
    image = Image.fromarray(columns, "L")
    kept = lib.Preprocessing(N_PX, (0, 0, 0), (1, 1, 1))(image)[0, 0] * 255
    np.testing.assert_allclose(kept, np.arange(first_column, first_column + N_PX), atol=1e-4)


def test_resize_keeps_the_aspect_ratio_with_torchvisions_size_rule():
    """A 5:1 image resized to short side 32 has a long side of int(32 * 203 / 40) = 162."""
    assert lib._resize_shortest_side(pil_image(203, 40), N_PX).size == (162, 32)
    assert lib._resize_shortest_side(pil_image(40, 203), N_PX).size == (32, 162)


def test_decode_reads_real_images():
    image = lib.decode_image(jpeg_bytes(64, 48, seed=1))
    assert image.size == (64, 48) and image.mode == "RGB"


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    pil_image(64, 48).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (jpeg_bytes(64, 48, seed=2)[:300], "decode: truncated file"),
        (png_bytes()[:200], "decode: truncated file"),
        (b"<html><body>404 Not Found</body></html>", "not an image"),
    ],
)
def test_undecodable_bytes_are_failures_with_stable_reasons(data, reason):
    with pytest.raises(lib.ImageFailure) as failure:
        lib.decode_image(data)
    assert failure.value.reason == reason


def test_load_image_never_raises(tmp_path):
    (tmp_path / "page.jpg").write_bytes(b"<html></html>")
    fetcher, preprocessing = lib.Fetcher(), lib.Preprocessing(N_PX)
    assert lib.load_image(str(tmp_path / "page.jpg"), fetcher, preprocessing).reason == "not an image"
    assert lib.load_image(str(tmp_path / "none.jpg"), fetcher, preprocessing).reason == "file not found"
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes(40, 30, seed=3))
    loaded = lib.load_image(str(tmp_path / "ok.jpg"), fetcher, preprocessing)
    assert loaded.reason is None and loaded.pixels.shape == (3, N_PX, N_PX) and loaded.size > 0
