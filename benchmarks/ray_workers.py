"""02 on this machine's cores: EXECUTOR="local" against Ray workers, on the same photos and model.

    python benchmarks/ray_workers.py [--images 512] [--chunk 64] [--model random] [--repeats 2]

Runs 02 over a folder of synthetic photos in turns: locally, on Ray workers of one core each (as
many as there are cores), and on one Ray worker with every core. Prints JSON: the Ray instance's
start, and per setup the median seconds of 02's embedding (workers starting and loading the model
included) and images per second. It measures; it claims nothing about clusters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from embed_folder import embed_params
from workload import MODEL_HELP, lib, model_path, photo_folder, temporary_workspace


def setups(cores: int) -> dict[str, dict]:
    """The runs compared, by name: EmbedParams overrides."""
    return {
        "local": {"executor": "local"},
        f"ray, {cores} workers x 1 core": {"executor": "ray", "cpus_per_worker": 1},
        f"ray, 1 worker x {cores} cores": {"executor": "ray", "cpus_per_worker": cores},
    }


def embed_seconds(folder, params: lib.EmbedParams) -> float:
    """01 and 02 over `folder` in a temporary workspace: the seconds of 02's embedding."""
    with temporary_workspace():
        metadata = lib.MetadataParams("folder", "validation", str(folder), "s3")
        collection = lib.collection(params.output_dir)
        lib.save_image_table(lib.build_image_table(metadata), metadata, collection)
        table = lib.load_image_table(collection)
        encoder = lib.run_encoder(params, collection)
        params = lib.with_machine_sizes(params, encoder)
        plan = lib.plan_run(params, collection, encoder, table)
        summary = lib.embed_chunks(table, encoder, plan, params)
    assert summary.embedded == len(table), summary
    return summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64, help="CHUNK: rows per chunk, the workers' unit")
    parser.add_argument("--model", default="random", help=MODEL_HELP)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    folder = photo_folder(args.images)
    cores = lib.settings.cpu_cores()
    arguments = argparse.Namespace(
        chunk=args.chunk,
        batch_size="auto",
        workers="auto",
        model=model_path(args.model),
        device="cpu",
        precision="fp32",
        preprocess="exact",
    )
    base = embed_params(arguments)
    began = time.perf_counter()
    lib.cluster.connect(None)
    report = {"images": args.images, "chunk": args.chunk, "cores": cores}
    report["ray_start_seconds"] = round(time.perf_counter() - began, 2)
    runs: dict[str, list[float]] = {name: [] for name in setups(cores)}
    for _ in range(args.repeats):
        for name, overrides in setups(cores).items():
            runs[name].append(embed_seconds(folder, dataclasses.replace(base, **overrides)))
    for name, seconds in runs.items():
        median = statistics.median(seconds)
        report[name] = {"seconds": round(median, 2), "images_per_second": round(args.images / median, 1)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
