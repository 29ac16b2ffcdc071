"""fp32 on the CPU, the model alone: torch with MKL sgemm, torch with oneDNN Linear layers (02), ONNX Runtime.

    python benchmarks/onednn_linear.py              # random ViT-B/32, batches of 32, 3 rounds

Each round times every runtime once on the same ready tensors, after a warm-up batch, so that the
machine's drift falls on all of them alike. Prints JSON: img/s of each runtime in each round and their
medians, and the largest difference of each runtime's L2-normalised vectors from plain torch's.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch
from workload import MODEL_HELP, images_per_second, lib, model_path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random", help=MODEL_HELP)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    onednn = lib.load_encoder(model_path(args.model), "cpu", "fp32")  # as 02 runs fp32 on a CPU
    plain = lib.model._clip_model(onednn.checkpoint.path, onednn.device, torch.float32, onednn=False)
    lib.load_encoder(model_path(args.model), "cpu", "int8")  # exports the image tower to ONNX, once
    digest = lib.model.weights_digest(onednn.checkpoint)
    exported = lib.onnx_tower.OnnxImageTower(
        lib.onnx_tower.tower_file(digest, "fp32"), lib.settings.cpu_cores()
    )

    def torch_plain(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            features = plain.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
        return lib.model._normalised(features).numpy()

    runtimes = {
        "torch, MKL sgemm": torch_plain,
        "torch, oneDNN Linear layers (02)": onednn.encode,
        "onnxruntime fp32, each image alone": lambda pixels: lib.model._normalised(
            torch.from_numpy(exported(pixels))
        ).numpy(),
    }
    size = onednn.preprocessing.image_size
    pixels = np.random.default_rng(0).standard_normal((args.images, 3, size, size), dtype=np.float32)
    rounds = [
        {
            name: round(images_per_second(encode, pixels, args.batch_size), 1)
            for name, encode in runtimes.items()
        }
        for _ in range(args.rounds)
    ]
    reference = torch_plain(pixels[: args.batch_size])
    report = {
        "device": lib.environment.describe_device("cpu"),
        "torch": torch.__version__,
        "img_s": rounds,
        "median_img_s": {name: statistics.median(each[name] for each in rounds) for name in runtimes},
        "largest_difference_from_torch_mkl": {
            name: float(np.abs(encode(pixels[: args.batch_size]) - reference).max())
            for name, encode in runtimes.items()
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
