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
IMAGES_PER_RESIZE = 64  # decoded images converted to float at once: bounds the device memory of a batch
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
        if self.exif_transpose and header.getexif().get(EXIF_ORIENTATION, 1) != 1:
            return False
        return not (self.apply_rotation and rotation in (90, 180, 270))

    def stack(self, prepared: Sequence[Prepared]) -> tuple[torch.Tensor, list[str | None]]:
        """A batch on the device, (n, 3, n_px, n_px) float32, and each image's failure reason or None.

        The batch holds the images that did not fail, in order. JPEGs the device cannot decode take
        the CPU path, which gives the reason of those that fail there too.
        """
        device = torch.device(self.device)
        encoded = {index: item.data for index, item in enumerate(prepared) if isinstance(item, EncodedJpeg)}
        decoded = dict(zip(encoded, _decoded(list(encoded.values()), device), strict=True))
        pixels: dict[int, torch.Tensor] = {}
        reasons: list[str | None] = [None] * len(prepared)
        for index, item in enumerate(prepared):
            if index in encoded and decoded[index] is None:
                item, reasons[index] = self._on_the_cpu(encoded[index])
            if isinstance(item, np.ndarray):
                pixels[index] = torch.from_numpy(item).to(device)
        on_device = [index for index, image in decoded.items() if image is not None]
        pixels.update(
            zip(on_device, self._preprocessed([decoded[index] for index in on_device]), strict=True)
        )
        size = self.preprocessing.image_size
        batch = [pixels[index] for index in sorted(pixels)]
        return torch.stack(batch) if batch else torch.empty(0, 3, size, size, device=device), reasons

    def _on_the_cpu(self, data: bytes) -> tuple[np.ndarray | None, str | None]:
        """A JPEG the device could not decode, through the CPU path: its pixels, or why it failed."""
        try:
            return ImageRecipe.__call__(self, data), None
        except ImageFailure as failure:
            return None, failure.reason

    def _preprocessed(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decoded (3, h, w) uint8 images -> normalised (3, n_px, n_px) float32, on their device, in order.

        Images of one size are resized together, IMAGES_PER_RESIZE at a time.
        """
        by_shape = collections.defaultdict(list)
        for index, image in enumerate(images):
            by_shape[tuple(image.shape[1:])].append(index)
        out: dict[int, torch.Tensor] = {}
        for (height, width), indices in by_shape.items():
            for low in range(0, len(indices), IMAGES_PER_RESIZE):
                group = indices[low : low + IMAGES_PER_RESIZE]
                pixels = self._resized_and_cropped(torch.stack([images[i] for i in group]), height, width)
                out.update(zip(group, self._normalised(pixels), strict=True))
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

    One call decodes the batch; it fails whole when one image does, and then each is decoded alone.
    """
    if not jpegs:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _DECODE_DEPRECATION, DeprecationWarning)
        try:
            return list(decode_jpeg(tensors, ImageReadMode.RGB, device))
        except RuntimeError:
            pass
        decoded: list[torch.Tensor | None] = []
        for tensor in tensors:
            try:
                decoded.append(decode_jpeg(tensor, ImageReadMode.RGB, device))
            except RuntimeError:
                decoded.append(None)
        return decoded
