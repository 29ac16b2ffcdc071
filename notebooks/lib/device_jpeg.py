"""02 with PREPROCESS='fast' on CUDA: JPEGs decoded on the GPU by batch (nvJPEG), then resized there.

Loader threads read each image's header only. An RGB JPEG that needs no turning stays bytes
(`EncodedJpeg`) until its batch is decoded on the device; every other image (other formats, grey and
CMYK JPEGs, images to turn, too many pixels) takes the CPU path of PREPROCESS='fast', with its
failure reasons. So does a JPEG that the device cannot decode.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .errors import ImageFailure
from .preprocess import ImageRecipe

DEVICE_PREPROCESSING_RULE = (
    "fast on the GPU: RGB JPEGs decoded by nvJPEG (others as PREPROCESS='fast' on the CPU); resize of the "
    "shortest side (torch, bicubic, antialiased; long side int(n_px*long/short)), rounded to 0..255; "
    "CenterCrop(n_px) at int(round((size - n_px) / 2)); /255; normalise with mean and std"
)
EXIF_ORIENTATION = 0x0112
IMAGES_PER_DECODE = 64  # JPEGs decoded and preprocessed at once: bounds the device memory of a batch
_DECODE_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


@dataclasses.dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG's bytes, left for the device to decode with its batch."""

    data: bytes


Prepared = np.ndarray | EncodedJpeg  # what the loader threads leave of an image for its batch


@dataclasses.dataclass(frozen=True)
class DeviceJpegRecipe(ImageRecipe):
    """ImageRecipe for PREPROCESS='fast' on a device: RGB JPEGs decoded and preprocessed there, by batch.

    `device` is where JPEGs are decoded: 'cuda' (nvJPEG) in 02; 'cpu' (libjpeg) runs the same code.
    """

    device: str = "cuda"

    def __call__(self, data: bytes, rotation: float | None = None) -> Prepared:
        if self._decodes_on_device(data, rotation):
            return EncodedJpeg(data)
        return super().__call__(data, rotation)

    def _decodes_on_device(self, data: bytes, rotation: float | None) -> bool:
        """Whether the header says: an RGB JPEG within the pixel limit that needs no turning."""
        try:
            header = Image.open(io.BytesIO(data))
        except Exception:  # the CPU path says what is wrong with it
            return False
        if header.format != "JPEG" or header.mode != "RGB" or header.width * header.height > self.max_pixels:
            return False
        if not data.rstrip(b"\0").endswith(b"\xff\xd9"):  # truncated, or data after the image: Pillow's call
            return False
        if self.exif_transpose and header.getexif().get(EXIF_ORIENTATION, 1) != 1:
            return False
        return not (self.apply_rotation and rotation in (90, 180, 270))

    def stack(self, prepared: Sequence[Prepared]) -> tuple[torch.Tensor, list[str | None]]:
        """A batch on the device, (n, 3, n_px, n_px) float32, and each image's failure reason or None.

        The batch holds the images that did not fail, in order. JPEGs are decoded and preprocessed
        IMAGES_PER_DECODE at a time; those the device cannot decode take the CPU path, which gives
        the reason of those that fail there too.
        """
        device = torch.device(self.device)
        pixels: dict[int, torch.Tensor] = {}
        reasons: list[str | None] = [None] * len(prepared)
        encoded = [index for index, item in enumerate(prepared) if isinstance(item, EncodedJpeg)]
        for low in range(0, len(encoded), IMAGES_PER_DECODE):
            group = encoded[low : low + IMAGES_PER_DECODE]
            decoded = _decoded([prepared[index].data for index in group], device)
            on_device = [
                (index, image) for index, image in zip(group, decoded, strict=True) if image is not None
            ]
            preprocessed = self._preprocessed([image for _, image in on_device])
            pixels.update(zip([index for index, _ in on_device], preprocessed, strict=True))
        for index, item in enumerate(prepared):
            if isinstance(item, EncodedJpeg) and index not in pixels:
                item, reasons[index] = self._on_the_cpu(item.data)
            if isinstance(item, np.ndarray):
                pixels[index] = torch.from_numpy(item).to(device)
        size = self.preprocessing.image_size
        batch = [pixels[index] for index in sorted(pixels)]
        return torch.stack(batch) if batch else torch.empty(0, 3, size, size, device=device), reasons

    def _on_the_cpu(self, data: bytes) -> tuple[np.ndarray | None, str | None]:
        """A JPEG the device could not decode, through the CPU path: its pixels, or why it failed."""
        try:
            return ImageRecipe.__call__(self, data), None
        except ImageFailure as failure:
            return None, failure.reason
        except (
            Exception
        ) as error:  # as load_image: one image, whatever is wrong with it, must not stop the run
            return None, f"error: {type(error).__name__}"

    def _preprocessed(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decoded (3, h, w) uint8 images -> normalised (3, n_px, n_px) float32, on their device, in order.

        Images of one size are resized together.
        """
        by_shape = collections.defaultdict(list)
        for index, image in enumerate(images):
            by_shape[tuple(image.shape[1:])].append(index)
        out: dict[int, torch.Tensor] = {}
        for (height, width), indices in by_shape.items():
            pixels = self._resized_and_cropped(torch.stack([images[i] for i in indices]), height, width)
            out.update(zip(indices, self._normalised(pixels), strict=True))
        return [out[index] for index in range(len(images))]

    def _resized_and_cropped(self, batch: torch.Tensor, height: int, width: int) -> torch.Tensor:
        size = self.preprocessing.image_size
        short, long = min(height, width), max(height, width)
        pixels = batch.float()
        if short != size:
            new_long = int(size * long / short)
            new_size = (new_long, size) if width <= height else (size, new_long)
            pixels = torch.nn.functional.interpolate(
                pixels, size=new_size, mode="bicubic", antialias=True, align_corners=False
            )
            pixels = pixels.round_().clamp_(0, 255)  # as an 8-bit image, which the exact path resizes to
        top = int(round((pixels.shape[2] - size) / 2.0))
        left = int(round((pixels.shape[3] - size) / 2.0))
        return pixels[:, :, top : top + size, left : left + size]

    def _normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.preprocessing.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocessing.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels / 255 - mean) / std

    def describe(self) -> dict:
        return {**super().describe(), "preprocessing": DEVICE_PREPROCESSING_RULE}


def _decoded(jpegs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG decoded to (3, h, w) uint8 RGB on `device`, or None where it cannot be.

    A call fails whole when one of its images does; then each half is decoded apart, so a bad JPEG
    costs about 2 log2(n) calls. On CUDA the device's queued work is waited for first: the decoder
    writes on a stream of its own, into memory that work, freed but not yet done, may still read.
    """
    if not jpegs:
        return []
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _DECODE_DEPRECATION, DeprecationWarning)
        return _decoded_halves(tensors, device)


def _decoded_halves(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(tensors, ImageReadMode.RGB, device))
    except RuntimeError:
        if len(tensors) == 1:
            return [None]
    half = len(tensors) // 2
    return _decoded_halves(tensors[:half], device) + _decoded_halves(tensors[half:], device)
