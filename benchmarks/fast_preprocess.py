"""PREPROCESS="fast" against "exact": agreement of the vectors, and the speed of each per core.

    python benchmarks/fast_preprocess.py                     # 1,000 photos, random ViT-B/32
    python benchmarks/fast_preprocess.py --images 200 --device cuda

Prints one JSON object: the minimum and mean cosine between each photo's vector from fast and from
exact preprocessing (fp32), and the images per second of each preprocessing in one thread.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from precision import encode_all
from throughput import preprocess_per_core
from workload import MODEL_HELP, lib, model_path, synthetic_jpeg


def fast_agreement(model: str, device: str, count: int, batch_size: int = 64) -> dict:
    """Cosines between fast and exact vectors of `count` photos, and each preprocessing's speed."""
    encoder = lib.load_encoder(model, device, "fp32")
    exact = lib.preprocess.ImageRecipe(encoder.preprocessing)
    fast = lib.preprocess.ImageRecipe(encoder.preprocessing, preprocess="fast")
    cosines = []
    for low in range(0, count, batch_size):
        photos = [synthetic_jpeg(seed) for seed in range(low, min(low + batch_size, count))]
        vectors = [
            encode_all(encoder, np.stack([recipe(data) for data in photos]), batch_size)
            for recipe in (exact, fast)
        ]
        cosines.append(np.sum(vectors[0] * vectors[1], axis=1))
    cosines = np.concatenate(cosines)
    sample = [synthetic_jpeg(seed) for seed in range(64)]
    return {
        "device": lib.environment.describe_device(device),
        "images": count,
        "min_cosine": round(float(cosines.min()), 6),
        "mean_cosine": round(float(cosines.mean()), 6),
        "exact_img_s_per_core": round(preprocess_per_core(exact, sample), 1),
        "fast_img_s_per_core": round(preprocess_per_core(fast, sample), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random", help=MODEL_HELP)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    report = fast_agreement(model_path(args.model), args.device, args.images)
    print(json.dumps({"model": args.model, **report}, indent=1))


if __name__ == "__main__":
    main()
