"""Throughput of 02 against the model alone and against the original notebooks' loop, side by side.

    python benchmarks/throughput.py                        # 512 photos, random ViT-B/32, this machine
    python benchmarks/throughput.py --precision bf16 --workers 2 --batch-size 32

Prints one JSON object, all on the same synthetic 1024x768 JPEGs with the same model:
  model_only_img_s             the model on ready tensors, after a warm-up batch
  preprocess_img_s_per_core    decode and exact preprocessing in one thread
  end_to_end_img_s             02's embed_chunks from local files, loopback S3 and loopback HTTP
  naive_loop_img_s             the original notebooks' loop (naive_loop.py), timed by its own process
  whole_process                embed_folder.py and naive_loop.py as processes, taking turns --repeats
                               times: each run's wall_seconds (start-up and model load included) and
                               own figures, and the speed-up of the median wall times
  peak_rss_mb                  of this process, and of each whole process
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import http.server
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from embed_folder import add_run_arguments, embed_params
from process_stats import peak_rss_mb
from workload import (
    embed_rows,
    lib,
    location_table,
    loopback_s3,
    model_path,
    photo_folder,
    temporary_workspace,
)

HERE = Path(__file__).resolve().parent


def timed(function, *args) -> float:
    """Seconds that function(*args) takes."""
    began = time.perf_counter()
    function(*args)
    return time.perf_counter() - began


def model_only(encoder: lib.model.ClipEncoder, count: int, batch_size: int) -> float:
    """Images per second of the model on ready, preprocessed tensors."""
    size = encoder.preprocessing.image_size
    pixels = np.random.default_rng(0).standard_normal((batch_size, 3, size, size), dtype=np.float32)
    encoder.encode(pixels)  # warm-up
    batches = max(1, count // batch_size)
    return batches * batch_size / timed(lambda: [encoder.encode(pixels) for _ in range(batches)])


def preprocess_per_core(recipe: lib.preprocess.ImageRecipe, photos: list[bytes]) -> float:
    """Images per second of decoding and preprocessing by `recipe`, in one thread."""
    return len(photos) / timed(lambda: [recipe(data) for data in photos])


def end_to_end(locations: list[str], encoder: lib.model.ClipEncoder, params: lib.EmbedParams) -> float:
    """Images per second of 02's embed_chunks over `locations`, written to a temporary workspace."""
    with temporary_workspace():
        summary = embed_rows(location_table(locations), encoder, params)
    if summary.embedded != len(locations):
        raise RuntimeError(f"only {summary.embedded} of {len(locations)} embedded: {summary}")
    return summary.attempted / summary.seconds


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def http_server(folder: Path) -> str:
    """A loopback HTTP server for `folder`; its base URL."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder)
    )
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def whole_process(script: str, folder: Path, extra: list[str]) -> dict:
    """Wall-clock seconds of a benchmark script as its own process, and what it printed."""
    began = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, str(HERE / script), str(folder), *extra], capture_output=True, text=True, check=True
    )
    return {
        **json.loads(finished.stdout.splitlines()[-1]),
        "wall_seconds": round(time.perf_counter() - began, 2),
    }


def side_by_side(folder: Path, pipeline_options: list[str], naive_options: list[str], repeats: int) -> dict:
    """The pipeline's and the naive loop's whole processes, taking turns; the speed-up of the medians."""
    runs: dict[str, list[dict]] = {"pipeline": [], "naive_loop": []}
    for _ in range(repeats):
        runs["pipeline"].append(whole_process("embed_folder.py", folder, pipeline_options))
        runs["naive_loop"].append(whole_process("naive_loop.py", folder, naive_options))
    medians = {name: statistics.median(run["wall_seconds"] for run in each) for name, each in runs.items()}
    speedup = round(medians["naive_loop"] / medians["pipeline"], 2)
    return {**runs, "median_wall_seconds": medians, "speedup": speedup}


def run_options(args: argparse.Namespace) -> list[str]:
    """The command-line options of this run, for embed_folder.py."""
    names = ("model", "device", "precision", "preprocess", "batch_size", "workers", "chunk")
    return [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument(
        "--local-only", action="store_true", help="only the model, preprocessing and local files"
    )
    parser.add_argument("--repeats", type=int, default=3, help="turns of each whole process")
    add_run_arguments(parser)
    args = parser.parse_args()
    folder = photo_folder(args.images)
    paths = sorted(folder.glob("*.jpg"))
    encoder = lib.load_encoder(model_path(args.model), args.device, args.precision)
    params = lib.with_machine_sizes(embed_params(args), encoder)
    recipe = lib.plan.image_recipe(encoder, params)
    report = {
        "device": lib.environment.describe_device(args.device),
        "model": args.model,
        "precision": encoder.precision,
        "images": args.images,
        "batch_size": params.gpu_batch_size,
        "workers": params.num_workers,
        "model_only_img_s": round(model_only(encoder, args.images, params.gpu_batch_size), 1),
        "preprocess_img_s_per_core": round(
            preprocess_per_core(recipe, [p.read_bytes() for p in paths[:64]]), 1
        ),
    }
    if args.local_only:
        report["end_to_end_img_s"] = {"local": round(end_to_end([str(p) for p in paths], encoder, params), 1)}
        print(json.dumps(report, indent=1))
        return
    names = [path.name for path in paths]
    http_base = http_server(folder)
    _, s3_endpoint = loopback_s3("photos", {path.name: path.read_bytes() for path in paths})
    over_s3 = dataclasses.replace(params, s3_endpoint_url=s3_endpoint)
    rates = {
        "local": end_to_end([str(path) for path in paths], encoder, params),
        "s3": end_to_end([f"s3://photos/{name}" for name in names], encoder, over_s3),
        "http": end_to_end([f"{http_base}/{name}" for name in names], encoder, params),
    }
    report["end_to_end_img_s"] = {source: round(rate, 1) for source, rate in rates.items()}
    naive_options = [f"--model={encoder.checkpoint.path}", f"--device={encoder.device}"]
    turns = side_by_side(folder, run_options(args), naive_options, args.repeats)
    naive_rates = [run["images"] / run["seconds"] for run in turns["naive_loop"]]
    report["naive_loop_img_s"] = round(statistics.median(naive_rates), 1)
    report["whole_process"] = turns
    report["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
