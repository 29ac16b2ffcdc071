"""The pipeline as one process: 01 (DATASET="folder") then 02, into a temporary workspace.

    python benchmarks/embed_folder.py FOLDER [--model random] [--device auto] [--precision auto]
        [--batch-size 64] [--workers 4] [--chunk 10000]

Prints JSON: images, embedded, seconds of 02's embedding (after the model is loaded), seconds of
each step before it (01's table, loading the model) and since the process started, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from process_stats import peak_rss_mb, seconds_since_start
from workload import MODEL_HELP, embed_rows, lib, model_path, temporary_workspace


def embed_params(args: argparse.Namespace) -> lib.EmbedParams:
    """02's parameters for this run, defaults elsewhere."""
    return lib.EmbedParams(
        start=0,
        end=None,
        chunk=args.chunk,
        gpu_batch_size=args.batch_size,
        num_workers=args.workers,
        model=args.model,
        model_revision=None,
        device=args.device,
        precision=args.precision,
        preprocess=args.preprocess,
        exif_transpose=False,
        apply_rotation=False,
        max_pixels=lib.preprocess.DEFAULT_MAX_PIXELS,
        s3_endpoint_url=None,
        retry_failed=False,
    )


def embed_folder(folder: Path, params: lib.EmbedParams, steps: dict[str, float]) -> lib.executor.RunSummary:
    """Load the model, then run 01 and 02 over `folder` in a temporary workspace; the step times in `steps`.

    The model loads in the repository's workspace, so that what its .cache/ holds (the int8 export) is reused.
    """
    began = time.perf_counter()
    encoder = lib.load_encoder(model_path(params.model), params.device, params.precision)  # .cache/ kept
    steps["model_seconds"] = round(time.perf_counter() - began, 2)
    with temporary_workspace():
        began = time.perf_counter()
        metadata = lib.MetadataParams("folder", "validation", str(folder), "s3")
        collection = lib.collection(params.output_dir)
        lib.save_image_table(lib.build_image_table(metadata), metadata, collection)
        table = lib.load_image_table(collection)
        steps["table_seconds"] = round(time.perf_counter() - began, 2)
        return embed_rows(table, encoder, params)


def size(value: str) -> int | str:
    """GPU_BATCH_SIZE or NUM_WORKERS as a command-line option: a number, or 'auto'."""
    return value if value == "auto" else int(value)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by the benchmarks that run the pipeline."""
    parser.add_argument("--model", default="random", help=MODEL_HELP)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=lib.params.PRECISIONS)
    parser.add_argument("--preprocess", default="exact", choices=lib.params.PREPROCESS_MODES)
    parser.add_argument("--batch-size", type=size, default=64, help="GPU_BATCH_SIZE: a number or 'auto'")
    parser.add_argument("--workers", type=size, default=4, help="NUM_WORKERS: a number or 'auto'")
    parser.add_argument("--chunk", type=int, default=10000, help="CHUNK")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    add_run_arguments(parser)
    args = parser.parse_args()
    steps = {"seconds_before_main": round(seconds_since_start(), 2)}
    summary = embed_folder(args.folder.resolve(), embed_params(args), steps)
    report = {"images": summary.attempted, "embedded": summary.embedded, "seconds": round(summary.seconds, 2)}
    print(json.dumps({**report, **steps, "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
