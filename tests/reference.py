"""An independent reference of OpenAI CLIP's `preprocess`, written from torchvision's semantics.

OpenAI's transform is Compose([Resize(n_px, BICUBIC), CenterCrop(n_px), _convert_image_to_rgb,
ToTensor(), Normalize(mean, std)]). This module follows torchvision's own code for PIL images step
by step, with torch tensor operations where torchvision uses them; it never calls lib.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize(image: Image.Image, size: int) -> Image.Image:
    """torchvision.transforms.functional.resize(img, size) for a PIL image and an int size."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (height, width) == (new_height, new_width):
        return image
    return image.resize((new_width, new_height), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision.transforms.functional.center_crop(img, [size, size]) for a PIL image."""
    width, height = image.size
    crop_top = int(round((height - size) / 2.0))
    crop_left = int(round((width - size) / 2.0))
    return image.crop((crop_left, crop_top, crop_left + size, crop_top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision.transforms.functional.to_tensor for an RGB PIL image."""
    array = np.array(image, np.uint8, copy=True)
    tensor = torch.from_numpy(array).view(image.size[1], image.size[0], 3)
    return tensor.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)


def normalize(tensor: torch.Tensor, mean, std) -> torch.Tensor:
    """torchvision.transforms.functional.normalize."""
    mean = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


def openai_preprocess(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    """OpenAI CLIP's preprocess(image), as a float32 (3, size, size) tensor."""
    image = center_crop(resize(image, size), size)
    return normalize(to_tensor(image.convert("RGB")), mean, std)


def reference_embeddings(model, images: list[Image.Image], size: int, mean, std) -> np.ndarray:
    """OpenAI's preprocess of each image, a direct CLIPModel forward, then L2 normalisation."""
    pixels = torch.stack([openai_preprocess(image, size, mean, std) for image in images])
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output
    return (features / features.norm(dim=-1, keepdim=True)).numpy()
