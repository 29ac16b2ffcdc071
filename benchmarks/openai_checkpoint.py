"""OpenAI .pt checkpoints: the cost of the first load (the conversion) and of later loads, and how far
02's vectors are from OpenAI's own `clip.load`, on a random checkpoint of ViT-B/32's shape.

    python benchmarks/openai_checkpoint.py                                   # TorchScript archive
    python benchmarks/openai_checkpoint.py --form "state dict" --images 64
    python benchmarks/openai_checkpoint.py --checkpoint ~/.cache/clip/ViT-B-32.pt   # OpenAI's own file

The random checkpoint is built with OpenAI's model code (`clip.model.CLIP`, fp16 as OpenAI publishes
its files) and kept in .cache/benchmarks/. Loads run in empty workspaces, so the first one converts.
Prints one JSON object: seconds to hash the file; for the process's first load (imports included),
another first load (hashing, conversion and model) and a later one (hashing, the converted folder
read); and the largest absolute difference from clip.load's L2-normalised vectors, images and texts.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from workload import CACHE, lib, synthetic_images, temporary_workspace

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip imports pkg_resources, which warns that it is deprecated
    import clip

TEXTS = ["a photo of a dog", "a red car parked by the sea", "two people laughing", "an empty room"]
VIT_B_32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32)
VIT_B_32.update(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8)
VIT_B_32.update(transformer_layers=12)


def random_openai_checkpoint(form: str, cache: Path = CACHE) -> Path:
    """A random ViT-B/32-shaped CLIP from OpenAI's model code, saved in `form`, made once into `cache`."""
    path = cache / f"openai-random-ViT-B-32-{form.replace(' ', '-')}.pt"
    if path.exists():
        return path
    torch.manual_seed(0)
    model = clip.model.CLIP(**VIT_B_32)
    clip.model.convert_weights(model)
    cache.mkdir(parents=True, exist_ok=True)
    if form == "TorchScript archive":
        inputs = (torch.zeros(1, 3, 224, 224, dtype=torch.float16), clip.tokenize(["a photo"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(model.eval(), inputs).save(str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


def timed(function, *args):
    """`function(*args)` and the seconds it took."""
    began = time.perf_counter()
    result = function(*args)
    return result, round(time.perf_counter() - began, 2)


def normalised(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


def openai_agreement(checkpoint: Path, images: int, texts: list[str] = TEXTS) -> dict:
    """Load costs of `checkpoint` through lib, and its vectors' largest difference from clip.load's."""
    _, hash_seconds = timed(lib.workspace.sha256_of_file, checkpoint)
    with temporary_workspace():  # the process's first load also imports what loading needs
        _, first_in_process = timed(lib.load_encoder, str(checkpoint), "cpu", "fp32")
    with temporary_workspace():
        _, first_load = timed(lib.load_encoder, str(checkpoint), "cpu", "fp32")
        encoder, later_load = timed(lib.load_encoder, str(checkpoint), "cpu", "fp32")
        photos = [Image.open(io.BytesIO(data)) for data in synthetic_images(images)]
        ours = encoder.encode(np.stack([encoder.preprocessing(photo) for photo in photos]))
        ours_text = encoder.encode_text(texts)
    model, preprocess = clip.load(str(checkpoint), device="cpu", jit=False)
    with torch.no_grad():
        theirs = normalised(model.encode_image(torch.stack([preprocess(photo) for photo in photos])))
        theirs_text = normalised(model.encode_text(clip.tokenize(texts, truncate=True)))
    return {
        "checkpoint": str(checkpoint),
        "megabytes": round(checkpoint.stat().st_size / 1e6, 1),
        "hash_seconds": hash_seconds,
        "first_load_in_the_process_seconds": first_in_process,
        "first_load_seconds": first_load,
        "later_load_seconds": later_load,
        "images": images,
        "image_max_abs_difference": float(np.abs(ours - theirs).max()),
        "texts": len(texts),
        "text_max_abs_difference": float(np.abs(ours_text - theirs_text).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="an OpenAI .pt file (default: a random one)")
    parser.add_argument(
        "--form", default="TorchScript archive", choices=["TorchScript archive", "state dict"]
    )
    parser.add_argument("--images", type=int, default=32, help="synthetic 1024x768 photos to compare on")
    args = parser.parse_args()
    checkpoint = args.checkpoint.expanduser() if args.checkpoint else random_openai_checkpoint(args.form)
    print(json.dumps(openai_agreement(checkpoint, args.images), indent=1))


if __name__ == "__main__":
    main()
