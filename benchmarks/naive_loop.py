"""The original notebooks' loop, as the baseline: open and convert, CLIPProcessor, forward, normalise.

    python benchmarks/naive_loop.py FOLDER [--model random] [--device cpu]

One batch of 32 after another, nothing overlapped, as the original notebook and the fashion-search
notebook do. Prints JSON: images, seconds (importing transformers, loading the model and the loop),
peak RSS. The process imports only what the original notebooks import (not lib), unless --model
names a random model to be built.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from process_stats import peak_rss_mb

BATCH = 32


def naive_embed(paths: list[Path], model: str, device: str = "cpu") -> np.ndarray:
    """Embeddings of `paths` the way the original notebooks compute them."""
    from transformers import CLIPImageProcessor, CLIPModel

    processor = CLIPImageProcessor.from_pretrained(model)  # the image half of CLIPProcessor
    clip = CLIPModel.from_pretrained(model).to(device).eval()
    vectors = []
    for low in range(0, len(paths), BATCH):
        images = [Image.open(path).convert("RGB") for path in paths[low : low + BATCH]]
        inputs = processor(images=images, return_tensors="pt").to(device)
        with torch.no_grad():
            features = clip.get_image_features(**inputs).pooler_output
        vectors.append((features / features.norm(dim=-1, keepdim=True)).cpu().numpy())
    return np.concatenate(vectors)


def checkpoint(model: str) -> str:
    """What from_pretrained takes for `model`; building a random model takes workload, and with it lib."""
    if model not in ("random", "random-small"):
        return model
    from workload import model_path

    return model_path(model)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument(
        "--model", default="random", help="a checkpoint folder or Hub name, or 'random' or 'random-small'"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    paths = sorted(args.folder.glob("*.jpg"))
    began = time.perf_counter()
    vectors = naive_embed(paths, checkpoint(args.model), args.device)
    seconds = time.perf_counter() - began
    print(json.dumps({"images": len(vectors), "seconds": round(seconds, 2), "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
