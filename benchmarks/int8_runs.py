"""How PRECISION='int8' runs on ONNX Runtime: each image alone, one core each, against batches on all cores.

    python benchmarks/int8_runs.py                  # random ViT-B/32, 256 images

Dynamic quantisation scales each input's activations by that input's own range, so in a batch an
image's vector depends on the other images. lib runs each image alone, as many at once as there are
cores, one thread each. This prints, for that and for one run per batch of 32 with a thread per core:
images per second, and the largest difference between an image's vector in its batch and alone.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from workload import MODEL_HELP, images_per_second, lib, model_path


def unit(features: np.ndarray) -> np.ndarray:
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random", help=MODEL_HELP)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    encoder = lib.load_encoder(model_path(args.model), "cpu", "int8")
    size, cores = encoder.preprocessing.image_size, lib.settings.cpu_cores()
    pixels = np.random.default_rng(0).standard_normal((args.images, 3, size, size), dtype=np.float32)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = cores
    path = lib.onnx_tower.tower_file(lib.model.weights_digest(encoder.checkpoint), "int8")
    batched = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run_batch(batch: np.ndarray) -> np.ndarray:
        return batched.run(None, {"pixel_values": batch})[0]

    alone = unit(encoder.image_tower(pixels[: args.batch_size]))
    in_batch = unit(run_batch(pixels[: args.batch_size]))
    report = {
        "device": lib.environment.describe_device("cpu"),
        "runtime": encoder.runtime,
        "images": args.images,
        "each image alone, one core each (lib)": round(
            images_per_second(encoder.image_tower, pixels, args.batch_size), 1
        ),
        f"batches of {args.batch_size}, {cores} threads": round(
            images_per_second(run_batch, pixels, args.batch_size), 1
        ),
        "largest difference, in a batch vs alone": round(float(np.abs(in_batch - alone).max()), 5),
        "min cosine, in a batch vs alone": round(float(np.sum(in_batch * alone, axis=1).min()), 6),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
