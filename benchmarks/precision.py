"""Agreement of each compute precision with fp32: cosine between the vectors of the same images.

    python benchmarks/precision.py                          # random ViT-B/32, this machine's device
    python benchmarks/precision.py --device cuda --images 500
    python benchmarks/precision.py --device cpu --precisions int8     # ONNX Runtime, dynamic int8
    python benchmarks/precision.py --model ViT-B/32         # OpenAI's weights, where the hub is reachable

Prints one JSON object: for each precision, the minimum and mean cosine with fp32 over the images,
and the seconds it took. Every precision encodes the same exactly preprocessed pixels.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from workload import MODEL_HELP, lib, model_path, synthetic_images


def preprocessed(count: int, preprocessing: lib.preprocess.Preprocessing) -> np.ndarray:
    """`count` synthetic photos, preprocessed exactly."""
    recipe = lib.preprocess.ImageRecipe(preprocessing)
    return np.stack([recipe(data) for data in synthetic_images(count)])


def encode_all(encoder: lib.model.ClipEncoder, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeddings of all `pixels`, `batch_size` at a time."""
    return np.concatenate(
        [encoder.encode(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    )


def precision_agreement(
    model: str, device: str, count: int, precisions: list[str], batch_size: int = 64
) -> dict:
    """Minimum and mean cosine of each precision's vectors with fp32's, on `count` images."""
    reference = lib.load_encoder(model, device, "fp32")
    pixels = preprocessed(count, reference.preprocessing)
    expected = encode_all(reference, pixels, batch_size)
    report = {
        "model": model,
        "model_revision": reference.checkpoint.revision,
        "device": str(reference.device),
        "device_name": lib.environment.describe_device(device),
        "images": count,
        "precisions": {},
    }
    del reference
    for precision in precisions:
        encoder = lib.load_encoder(model, device, precision)
        began = time.perf_counter()
        cosines = np.sum(encode_all(encoder, pixels, batch_size) * expected, axis=1)
        report["precisions"][precision] = {
            "min_cosine": round(float(cosines.min()), 6),
            "mean_cosine": round(float(cosines.mean()), 6),
            "seconds": round(time.perf_counter() - began, 1),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random", help=MODEL_HELP)
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--images", type=int, default=300, help="synthetic 1024x768 photos to compare on")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16", "int8"])
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    report = precision_agreement(
        model_path(args.model), args.device, args.images, args.precisions, args.batch_size
    )
    print(json.dumps({**report, "model": args.model}, indent=1))


if __name__ == "__main__":
    main()
