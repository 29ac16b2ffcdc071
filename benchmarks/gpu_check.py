"""02 on a GPU from local JPEGs, exact and fast: throughput, their agreement, and how busy the GPU was.

    benchmarks/gpu_check.sh                  # `pytest -m gpu`, then this, into one JSON file
    python benchmarks/gpu_check.py --out gpu_check.json [--images 4096] [--agreement 1000]

The photos are synthetic 1024x768 JPEGs (workload.py), written once by all cores; the model is a
random ViT-B/32. For each PREPROCESS mode, 02's embed_chunks runs once on a few photos to warm up, then
over all of them with GPU_BATCH_SIZE and NUM_WORKERS 'auto', while a thread reads the GPU's utilisation
(NVML, through torch.cuda.utilization) every 0.1 s. Agreement: the cosine between the fast and the exact
vector of each of the first --agreement photos.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
from embed_folder import embed_params
from workload import embed_rows, lib, location_table, model_path, photo_folder, temporary_workspace

WARM_UP_IMAGES = 256
SAMPLE_SECONDS = 0.1
BUSY = 90  # percent: a sample at or above it counts as busy


class UtilisationSampler:
    """Reads the GPU's utilisation every SAMPLE_SECONDS while it is entered (nothing on a CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.samples: list[int] = []
        self.error: str | None = None if device.type == "cuda" else "not a CUDA device"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> UtilisationSampler:
        if self.error is None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception as error:  # no NVML (nvidia-ml-py) here: say so in the report
                self.error = f"{type(error).__name__}: {error}"
                return

    def report(self) -> dict:
        if not self.samples:
            return {"gpu_busy_mean_percent": None, "why_none": self.error or "no sample"}
        return {
            "gpu_busy_mean_percent": round(statistics.mean(self.samples), 1),
            f"samples_at_least_{BUSY}_percent": round(
                sum(s >= BUSY for s in self.samples) / len(self.samples), 3
            ),
            "samples": len(self.samples),
        }


def embedded(
    locations: list[str], encoder: lib.model.ClipEncoder, params: lib.EmbedParams
) -> tuple[dict, np.ndarray]:
    """02 over `locations` in a temporary workspace: the run's figures and its vectors, in row order."""
    with temporary_workspace(), UtilisationSampler(encoder.device) as sampler:
        summary = embed_rows(location_table(locations), encoder, params)
        chunks = lib.find_chunks(lib.collection(params.output_dir).chunks)
        vectors = np.concatenate([lib.chunkfile.read_chunk_result(info.path).embeddings() for info in chunks])
    if summary.embedded != len(locations):
        raise RuntimeError(f"only {summary.embedded} of {len(locations)} embedded: {summary}")
    figures = {
        "img_s": round(summary.attempted / summary.seconds, 1),
        "seconds": round(summary.seconds, 2),
        "waited_for_images_seconds": round(summary.waited_seconds, 2),
        "first_batch_seconds": round(summary.first_batch_seconds, 2),
        **sampler.report(),
    }
    return figures, vectors


def mode_params(mode: str, device: str) -> lib.EmbedParams:
    """02's parameters for one PREPROCESS mode at fp16 (fp32 on a CPU), sizes 'auto', one chunk."""
    precision = "fp16" if device.startswith("cuda") else "fp32"
    options = {"model": "random", "device": device, "precision": precision, "preprocess": mode}
    return embed_params(argparse.Namespace(**options, chunk=1_000_000, batch_size="auto", workers="auto"))


def gpu_check(model: str, device: str, images: int, agreement: int) -> dict:
    """The figures of both modes and their agreement."""
    began = time.perf_counter()
    locations = [str(path) for path in sorted(photo_folder(images).glob("*.jpg"))]
    photos_seconds = time.perf_counter() - began
    report: dict = {"device": lib.environment.describe_device(device), "torch": torch.__version__}
    report |= {"cuda": torch.version.cuda, "cores": lib.settings.cpu_cores(), "images": images}
    report["photos_written_seconds"] = round(photos_seconds, 1)
    vectors = {}
    for mode in ("exact", "fast"):
        params = mode_params(mode, device)
        encoder = lib.load_encoder(model, device, params.precision)
        params = lib.with_machine_sizes(params, encoder)
        embedded(locations[:WARM_UP_IMAGES], encoder, params)
        figures, vectors[mode] = embedded(locations, encoder, params)
        report[mode] = {"precision": encoder.precision, "batch_size": params.gpu_batch_size, **figures}
        report["workers"] = params.num_workers
    cosines = np.sum(vectors["fast"][:agreement] * vectors["exact"][:agreement], axis=1)
    report["fast_vs_exact"] = {
        "photos": len(cosines),
        "min_cosine": round(float(cosines.min()), 6),
        "mean_cosine": round(float(cosines.mean()), 6),
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument(
        "--model", default="random", help="'random' (ViT-B/32's shape) or MODEL as 02 takes it"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument(
        "--agreement", type=int, default=1000, help="photos whose fast and exact vectors are compared"
    )
    parser.add_argument("--pytest-status", type=int, help="the exit status of `pytest -m gpu`")
    parser.add_argument("--pytest-log", type=Path, help="its output, whose last line goes in the report")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU here")
    began = time.perf_counter()
    report = gpu_check(model_path(args.model), args.device, args.images, args.agreement)
    if args.pytest_log:
        lines = args.pytest_log.read_text().strip().splitlines()
        report["pytest_gpu"] = {"status": args.pytest_status, "summary": lines[-1] if lines else ""}
    report["seconds"] = round(time.perf_counter() - began, 1)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
