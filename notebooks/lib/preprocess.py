"""02's second step per image: bytes -> decoded, oriented, OpenAI-preprocessed float32 pixels.

The transform reproduces OpenAI CLIP's `preprocess` bit for bit without torchvision; `ImageRecipe`
adds the run's options (orientation, the pixel limit, PREPROCESS='fast' or 'pad').
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageFailure
from .settings import prepare_process

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSING_RULE = (
    "openai-clip: first frame; 16-bit and float images (I;16, I, F) to 8-bit grey by their own "
    "min..max; Resize(n_px, bicubic) of the shortest side (long side int(n_px*long/short), "
    "no resample when short == n_px); CenterCrop(n_px) at int(round((size - n_px) / 2)); "
    "convert('RGB'); /255; normalise with mean and std"
)
DEFAULT_MAX_PIXELS = 100_000_000
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """The first frame of an image, decoded; bad bytes or too many pixels raise ImageFailure.

    With `draft_size`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft mode) as long as
    its short side stays at least `draft_size`: faster, and close to, not equal to, a full decode.
    """
    prepare_process()
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ImageFailure("too many pixels")
        if draft_size and image.format == "JPEG":
            scale = draft_size / min(image.size)
            image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()
    except UnidentifiedImageError:
        raise ImageFailure("not an image") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        IndexError,  # Pillow 12's QOI decoder, on a cut file
        struct.error,
        NotImplementedError,
    ) as error:
        raise ImageFailure(_decode_reason(error)) from None
    return image


_TRUNCATION_SIGNS = ("truncated", "not enough image data", "expected to read", "incomplete", "premature end")


def _decode_reason(error: Exception) -> str:
    """A stable reason for an image that Pillow could not decode; the details vary with each file."""
    message = str(error).lower()
    if any(sign in message for sign in _TRUNCATION_SIGNS) or isinstance(error, EOFError):
        return "decode: truncated file"
    if "ghostscript" in message:
        return "decode: EPS needs Ghostscript"
    return "decode: corrupt data"


def rotate(image: Image.Image, degrees: float | None) -> Image.Image:
    """Rotate counter-clockwise by 0, 90, 180 or 270 degrees (Open Images' Rotation); NaN, None: as is."""
    return image.transpose(_ROTATIONS[int(degrees)]) if degrees in _ROTATIONS else image


def to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit and float images as 8-bit grey, their own min..max stretched to 0..255; others as they are.

    Each value v becomes rint((v - min) / (max - min) * 255) in float64, over the finite values;
    NaN counts as min, +inf as max. Pillow would clip at 255 (a white image). A constant image is black.
    """
    if image.mode not in HIGH_DEPTH_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low
    if high > low:
        values = np.rint(values / (high - low) * 255)  # float64; halves to even
    return Image.fromarray(values.astype(np.uint8), "L")


def pad_to_square(image: Image.Image) -> Image.Image:
    """imgbeddings' padding: the image in RGB, centred on a black square as wide as its long side."""
    try:
        image = to_8_bits(image).convert("RGB")
    except ValueError:
        raise ImageFailure(f"decode: unsupported mode {image.mode}") from None
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) on a PIL image: bicubic, long side int(size * long / short)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop(size) of an image at least `size` on each side."""
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """OpenAI CLIP's `preprocess`: resize, center crop, RGB, scale and normalise; float32 CHW."""

    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = to_8_bits(image)
        try:
            image = _center_crop(_resize_shortest_side(image, self.image_size), self.image_size)
            image = image.convert("RGB")
        except ValueError:
            raise ImageFailure(f"decode: unsupported mode {image.mode}") from None
        channels = np.asarray(image)
        pixels = np.empty((3, *channels.shape[:2]), np.float32)
        for channel, values in enumerate(self._normalised_values):
            np.take(values, channels[..., channel], out=pixels[channel])
        return pixels

    @functools.cached_property
    def _normalised_values(self) -> np.ndarray:
        """(3, 256): each channel's byte values scaled to [0, 1] and normalised, in float32.

        Looking values up gives the very floats that computing them image by image would.
        """
        scaled = np.arange(256, dtype=np.float32)[:, None] / np.float32(255)
        return np.ascontiguousarray(((scaled - np.float32(self.mean)) / np.float32(self.std)).T)

    def describe(self) -> dict:
        """What a chunk file records about the preprocessing."""
        return {
            "image_size": self.image_size,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "preprocessing": PREPROCESSING_RULE,
        }


@dataclasses.dataclass(frozen=True)
class ImageRecipe:
    """Everything 02 does to an image's bytes before the model: decode, orient, preprocess."""

    preprocessing: Preprocessing
    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_transpose: bool = False
    apply_rotation: bool = False
    preprocess: str = "exact"  # or "fast": JPEGs decoded in draft mode; "pad": padded to a square

    def __call__(self, data: bytes, rotation: float | None = None) -> np.ndarray:
        draft_size = self.preprocessing.image_size if self.preprocess == "fast" else None
        image = decode_image(data, self.max_pixels, draft_size)
        if self.exif_transpose:
            image = ImageOps.exif_transpose(image)
        if self.apply_rotation:
            image = rotate(image, rotation)
        if self.preprocess == "pad":
            image = pad_to_square(image)  # so that the center crop keeps the whole image
        return self.preprocessing(image)

    def stack(self, prepared: Sequence[np.ndarray]) -> tuple[np.ndarray, list[str | None]]:
        """A batch of prepared images for the encoder, and each one's failure reason (none fail here)."""
        return np.stack(prepared), [None] * len(prepared)

    def describe(self) -> dict:
        """The recipe's own options, as chunk files record them (the preprocessing is the encoder's)."""
        return {
            "preprocess": self.preprocess,
            "exif_transpose": self.exif_transpose,
            "apply_rotation": self.apply_rotation,
            "max_pixels": self.max_pixels,
        }
