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
    ours = lib.preprocess.Preprocessing(N_PX)(image)
    reference = openai_preprocess(image, N_PX, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD).numpy()
    assert ours.dtype == np.float32 and ours.shape == (3, N_PX, N_PX)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "PA", "RGBA", "CMYK", "1"])
def test_every_8bit_mode_equals_the_reference(mode):
    image = pil_image(47, 61, mode=mode, seed=3)
    ours = lib.preprocess.Preprocessing(N_PX)(image)
    reference = openai_preprocess(image, N_PX, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD).numpy()
    np.testing.assert_array_equal(ours, reference)


def test_a_336_pixel_checkpoint_and_its_own_mean_and_std():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)
    image = pil_image(500, 377, seed=7)
    ours = lib.preprocess.Preprocessing(336, mean, std)(image)
    np.testing.assert_array_equal(ours, openai_preprocess(image, 336, mean, std).numpy())


@pytest.mark.parametrize(("width", "first_column"), [(33, 0), (34, 1), (35, 2), (37, 2), (39, 4)])
def test_center_crop_rounds_half_to_even_like_torchvision(width, first_column):
    """Columns numbered by value: the crop keeps columns from int(round((W - n_px) / 2))."""
    columns = np.tile(np.arange(width, dtype=np.uint8), (N_PX, 1))
    image = Image.fromarray(columns, "L")
    kept = lib.preprocess.Preprocessing(N_PX, (0, 0, 0), (1, 1, 1))(image)[0, 0] * 255
    np.testing.assert_allclose(kept, np.arange(first_column, first_column + N_PX), atol=1e-4)


def test_resize_keeps_the_aspect_ratio_with_torchvisions_size_rule():
    """A 5:1 image resized to short side 32 has a long side of int(32 * 203 / 40) = 162."""
    assert lib.preprocess._resize_shortest_side(pil_image(203, 40), N_PX).size == (162, 32)
    assert lib.preprocess._resize_shortest_side(pil_image(40, 203), N_PX).size == (32, 162)


def test_decode_reads_real_images():
    image = lib.preprocess.decode_image(jpeg_bytes(64, 48, seed=1))
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
        lib.preprocess.decode_image(data)
    assert failure.value.reason == reason


def test_load_image_never_raises(tmp_path):
    (tmp_path / "page.jpg").write_bytes(b"<html></html>")
    fetcher, recipe = lib.Fetcher(), lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX))
    assert lib.embed.load_image(str(tmp_path / "page.jpg"), 0, fetcher, recipe).reason == "not an image"
    assert lib.embed.load_image(str(tmp_path / "none.jpg"), 0, fetcher, recipe).reason == "file not found"
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes(40, 30, seed=3))
    loaded = lib.embed.load_image(str(tmp_path / "ok.jpg"), 0, fetcher, recipe)
    assert loaded.reason is None and loaded.pixels.shape == (3, N_PX, N_PX) and loaded.size > 0


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def stretched_to_8_bits(values: np.ndarray) -> Image.Image:
    """The documented rule, written independently: finite min..max to 0..255, half to even."""
    values = values.astype(np.float64)
    low, high = np.nanmin(values), np.nanmax(values)
    return Image.fromarray(np.round((values - low) / (high - low) * 255).astype(np.uint8), "L")


@pytest.mark.parametrize(
    ("mode", "values"),
    [
        ("I;16", np.linspace(1000, 4000, 45 * 37).reshape(37, 45).astype(np.uint16)),  # 12 bits in 16
        ("I;16B", np.linspace(0, 65535, 45 * 37).reshape(37, 45).astype(">u2")),
        ("I", np.linspace(-70000, 90000, 45 * 37).reshape(37, 45).astype(np.int32)),
        ("F", np.linspace(0.2, 0.7, 45 * 37).reshape(37, 45).astype(np.float32)),
    ],
)
def test_16_bit_and_float_images_are_stretched_by_their_own_range_not_clipped(mode, values):
    image = Image.frombytes(mode, (45, 37), values.tobytes())
    ours = lib.preprocess.Preprocessing(N_PX)(image)
    expected = openai_preprocess(
        stretched_to_8_bits(values), N_PX, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD
    )
    np.testing.assert_array_equal(ours, expected.numpy())
    white = openai_preprocess(
        Image.new("L", (45, 37), 255), N_PX, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD
    )
    assert not np.allclose(ours, white.numpy())


def test_a_16_bit_png_decodes_to_the_full_8_bit_range():
    values = np.linspace(0, 60000, 64 * 48).reshape(48, 64).astype(np.uint16)
    image = lib.preprocess.decode_image(encoded(Image.fromarray(values), "PNG"))
    assert image.mode == "I;16"
    assert lib.preprocess.to_8_bits(image).getextrema() == (0, 255)


def test_float_images_with_nan_and_constant_images_still_give_pixels():
    values = np.full((20, 20), np.nan, np.float32)
    values[5:, :] = np.linspace(0, 1, 300).reshape(15, 20)
    values[0, 0] = np.inf
    assert lib.preprocess.to_8_bits(Image.fromarray(values)).getextrema() == (0, 255)
    assert lib.preprocess.to_8_bits(Image.fromarray(np.full((8, 8), 7, np.uint16))).getextrema() == (0, 0)


ANIMATED = [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})]


@pytest.mark.parametrize(("format", "options"), ANIMATED)
def test_animated_images_give_their_first_frame(format, options, tmp_path):
    first, second = pil_image(50, 40, seed=11), pil_image(50, 40, seed=12)
    path = tmp_path / f"animated.{format.lower()}"
    first.save(path, format, save_all=True, append_images=[second], duration=100, loop=0, **options)
    recipe = lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX))
    ours = recipe(path.read_bytes())
    with Image.open(path) as opened:  # OpenAI's idiom: preprocess(Image.open(path))
        assert getattr(opened, "n_frames", 1) == 2
        np.testing.assert_array_equal(
            ours, openai_preprocess(opened, N_PX, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD)
        )
    with Image.open(path) as opened:
        opened.seek(1)
        later = openai_preprocess(opened, N_PX, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD).numpy()
    assert not np.allclose(ours, later)


def upright_and_tagged(orientation: int) -> tuple[Image.Image, bytes]:
    """A lossless image and a file holding it turned sideways with an EXIF tag to undo that."""
    upright = pil_image(48, 36, seed=5)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 undoes this turn
    exif = Image.Exif()
    exif[0x0112] = orientation
    return upright, encoded(stored, "PNG", exif=exif)


def test_exif_orientation_is_ignored_by_default_as_openai_does():
    upright, data = upright_and_tagged(6)
    stored = Image.open(io.BytesIO(data))
    expected = openai_preprocess(stored, N_PX, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD).numpy()
    np.testing.assert_array_equal(
        lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX))(data), expected
    )


def test_exif_transpose_turns_the_image_upright():
    upright, data = upright_and_tagged(6)
    recipe = lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX), exif_transpose=True)
    expected = openai_preprocess(upright, N_PX, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD).numpy()
    np.testing.assert_array_equal(recipe(data), expected)


@pytest.mark.parametrize("degrees", [0, 90, 180, 270, float("nan")])
def test_apply_rotation_turns_counter_clockwise_by_the_tables_degrees(degrees):
    image = pil_image(48, 36, seed=6)
    data = encoded(image, "PNG")
    turns = 0 if np.isnan(degrees) else int(degrees) // 90
    turned = Image.fromarray(np.rot90(np.asarray(image), turns))  # numpy's rot90 is counter-clockwise
    expected = openai_preprocess(turned, N_PX, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD).numpy()
    np.testing.assert_array_equal(
        lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX), apply_rotation=True)(data, degrees),
        expected,
    )
    unrotated = openai_preprocess(image, N_PX, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD).numpy()
    np.testing.assert_array_equal(
        lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX))(data, degrees), unrotated
    )


def png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height: a decompression bomb's shape."""
    import struct
    import zlib

    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def test_images_over_the_pixel_limit_fail_before_decoding():
    with pytest.raises(lib.ImageFailure) as failure:
        lib.preprocess.decode_image(png_with_size(60_000, 60_000))  # 3.6 gigapixels, 70 bytes
    assert failure.value.reason == "too many pixels"
    data = encoded(pil_image(100, 80), "PNG")
    assert lib.preprocess.decode_image(data, max_pixels=8000).size == (100, 80)
    with pytest.raises(lib.ImageFailure, match="too many pixels"):
        lib.preprocess.decode_image(data, max_pixels=7999)


def test_a_mode_that_cannot_become_rgb_is_a_failure_with_a_reason():
    with pytest.raises(lib.ImageFailure) as failure:
        lib.preprocess.Preprocessing(N_PX)(Image.new("La", (40, 40)))
    assert failure.value.reason == "decode: unsupported mode La"


def test_fast_preprocessing_decodes_jpegs_at_a_reduced_scale_and_stays_close():
    data = jpeg_bytes(400, 300, seed=4)
    drafted = lib.preprocess.decode_image(data, draft_size=N_PX)
    assert drafted.size[0] < 400 and min(drafted.size) >= N_PX
    exact = lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX))(data)
    fast = lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX), preprocess="fast")(data)
    assert fast.shape == exact.shape and not np.array_equal(fast, exact)
    assert np.abs(fast - exact).mean() < 0.1  # in normalised units: about 7 of 255 grey levels


def test_fast_preprocessing_leaves_other_formats_exact():
    data = encoded(pil_image(400, 300, seed=4), "PNG")
    exact = lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX))(data)
    np.testing.assert_array_equal(
        lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX), preprocess="fast")(data), exact
    )


@pytest.mark.parametrize("size", [(40, 24), (24, 40), (33, 33)])
@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA"])
def test_pad_preprocessing_centres_the_image_on_a_black_square_as_imgbeddings_does(size, mode):
    image = pil_image(*size, seed=5).convert(mode)
    rgb = np.asarray(image.convert("RGB"))
    side = max(size)
    square = np.zeros((side, side, 3), np.uint8)
    top, left = (side - size[1]) // 2, (side - size[0]) // 2
    square[top : top + size[1], left : left + size[0]] = rgb
    expected = openai_preprocess(
        Image.fromarray(square), N_PX, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD
    )
    padded = lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX), preprocess="pad")
    np.testing.assert_array_equal(padded(encoded(image, "PNG")), expected.numpy())


def test_pad_preprocessing_records_itself_and_refuses_modes_without_rgb():
    padded = lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX), preprocess="pad")
    assert padded.describe()["preprocess"] == "pad"
    with pytest.raises(lib.ImageFailure, match="decode: unsupported mode La"):
        lib.preprocess.pad_to_square(Image.new("La", (40, 30)))
