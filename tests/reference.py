"""OpenAI CLIP's own `preprocess`, from OpenAI's `clip` package and torchvision; it never calls lib.

With OpenAI's statistics the transform is `clip.clip._transform(n_px)` itself: Compose([Resize(n_px,
BICUBIC), CenterCrop(n_px), convert to RGB, ToTensor(), Normalize(mean, std)]). A checkpoint with other
statistics gets the same torchvision steps with its own mean and std.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip imports pkg_resources, which warns that it is deprecated
    import clip

OPENAI_STATISTICS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def openai_transform(size: int, mean, std) -> transforms.Compose:
    """OpenAI's transform for `size` pixels: clip's own, or its steps with another mean and std."""
    if (tuple(mean), tuple(std)) == OPENAI_STATISTICS:
        return clip.clip._transform(size)
    resample = transforms.InterpolationMode.BICUBIC
    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=resample),
            transforms.CenterCrop(size),
            lambda image: image.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def openai_preprocess(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    """OpenAI CLIP's preprocess(image), as a float32 (3, size, size) tensor."""
    return openai_transform(size, mean, std)(image)


def reference_embeddings(model, images: list[Image.Image], size: int, mean, std) -> np.ndarray:
    """OpenAI's preprocess of each image, a direct CLIPModel forward, then L2 normalisation."""
    pixels = torch.stack([openai_preprocess(image, size, mean, std) for image in images])
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


# OpenAI's model code: small random checkpoints in the forms clip.load reads, and what clip.load makes of them

OPENAI_FORMS = ("state dict", "TorchScript archive", "fp32 state dict")


def openai_clip_model(vision_layers: int | tuple = 2) -> torch.nn.Module:
    """A random CLIP from OpenAI's `clip.model`, in fp16 as OpenAI publishes theirs (32 px, 32-d vectors).

    Widths are 64, the least for which OpenAI's build_model finds a head (width / 64); the vocabulary
    is CLIP's whole BPE one, so that clip.tokenize's ids are valid.
    """
    torch.manual_seed(0)
    model = clip.model.CLIP(
        embed_dim=32,
        image_resolution=32,
        vision_layers=vision_layers,
        vision_width=64,
        vision_patch_size=8,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=2,
    )
    clip.model.convert_weights(model)
    return model.eval()


def save_openai_checkpoint(model: torch.nn.Module, path, form: str) -> None:
    """Save `model` as a `form` of OPENAI_FORMS (the fp32 state dict holds the same, fp16-exact values)."""
    if form == "TorchScript archive":
        inputs = (torch.zeros(1, 3, 32, 32, dtype=torch.float16), clip.tokenize(["a photo"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on OpenAI's code
            torch.jit.trace(model, inputs).save(str(path))
    elif form == "fp32 state dict":
        torch.save({name: tensor.float() for name, tensor in model.state_dict().items()}, path)
    else:
        torch.save(model.state_dict(), path)


def _normalised(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


def openai_image_embeddings(checkpoint, files: dict) -> dict:
    """clip.load(checkpoint, 'cpu', jit=False), then preprocess(Image.open(f)) and encode_image, per file.

    A file that OpenAI's code cannot open or preprocess maps to None.
    """
    model, preprocess = clip.load(str(checkpoint), device="cpu", jit=False)
    vectors = {}
    for name, path in files.items():
        try:
            pixels = preprocess(Image.open(path))
        except (OSError, ValueError):
            vectors[name] = None
            continue
        with torch.no_grad():
            vectors[name] = _normalised(model.encode_image(pixels[None]))[0]
    return vectors


def openai_text_embeddings(checkpoint, texts: list[str]) -> np.ndarray:
    """clip.load(checkpoint, 'cpu', jit=False), then encode_text(clip.tokenize(texts)), normalised."""
    model, _ = clip.load(str(checkpoint), device="cpu", jit=False)
    with torch.no_grad():
        return _normalised(model.encode_text(clip.tokenize(texts, truncate=True)))
