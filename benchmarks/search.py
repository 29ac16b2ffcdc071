"""Search over a merged-format file of N x D unit vectors: exact (streamed) and approximate (FAISS IVF).

    python benchmarks/search.py                      # 1,000,000 x 512, this machine
    python benchmarks/search.py --rows 100000 --dimension 64

Prints one JSON object:
  exact_seconds_per_query       top-10 of one query, the file read block by block
  exact_seconds_per_query_in_batches_of_10
  peak_rss_mb                   of the exact searches (the file itself is 4 x N x D bytes)
  ivf: build_seconds, lists, nprobe, seconds_per_query, recall_at_10 against exact, for uniformly
       random vectors (the hardest case) and for clustered ones (closer to real image embeddings),
       and recall_at_10 when more lists are scanned
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np
from process_stats import peak_rss_mb
from workload import CACHE, lib

QUERIES = 100
BLOCK = 50_000


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def random_block(
    rng: np.random.Generator, rows: int, dimension: int, centres: np.ndarray | None
) -> np.ndarray:
    """Uniformly random unit vectors or, with `centres`, unit vectors scattered around those."""
    noise = rng.standard_normal((rows, dimension), dtype=np.float32)
    if centres is None:
        return unit(noise)
    return unit(centres[rng.integers(0, len(centres), rows)] + 0.05 * noise)


def vectors_file(rows: int, dimension: int, clustered: bool) -> Path:
    """A merged-format file of `rows` unit vectors under .cache/benchmarks/, written once, block by block."""
    path = CACHE / f"search-{'clustered' if clustered else 'random'}-{rows}x{dimension}.h5"
    if path.is_file():
        return path
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((1000, dimension), dtype=np.float32)) if clustered else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with lib.workspace.atomic_file(path) as temporary, h5py.File(temporary, "w") as file:
        file.create_dataset("embeddings", shape=(rows, dimension), dtype=np.float32)
        for name in ("image_ids", "urls"):
            file.create_dataset(name, shape=(rows,), dtype=h5py.string_dtype())
        file["rows"] = np.arange(rows, dtype=np.int64)
        for start in range(0, rows, BLOCK):
            end = min(start + BLOCK, rows)
            file["embeddings"][start:end] = random_block(rng, end - start, dimension, centres)
            file["image_ids"][start:end] = [f"{i:09d}" for i in range(start, end)]
            file["urls"][start:end] = [f"s3://bucket/{i:09d}.jpg" for i in range(start, end)]
        file.attrs["chunks"] = json.dumps([[path.name, "benchmark"]])
    return path


def near_queries(embeddings: lib.nearest.EmbeddingsFile) -> np.ndarray:
    """QUERIES unit vectors near vectors of the file, as image and text queries are near the images."""
    rng = np.random.default_rng(1)
    positions = np.sort(rng.choice(embeddings.count, QUERIES, replace=False))
    near = np.stack([embeddings.vector(int(position)) for position in positions])
    return unit(near + 0.05 * rng.standard_normal(near.shape, dtype=np.float32))


def seconds_per_query(embeddings: lib.nearest.EmbeddingsFile, queries: np.ndarray, batch: int) -> float:
    began = time.perf_counter()
    for low in range(0, len(queries), batch):
        lib.search(embeddings, queries[low : low + batch], 10)
    return (time.perf_counter() - began) / len(queries)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / exact.shape[1] for f, e in zip(found, exact, strict=True)]))


def ivf_figures(embeddings: lib.nearest.EmbeddingsFile, queries: np.ndarray) -> dict:
    """Build time, query time and recall@10 of the IVF index, at its nprobe and when scanning more lists."""
    exact = lib.search(embeddings, queries, 10).positions
    began = time.perf_counter()
    index = lib.nearest.build_ivf(embeddings)
    build_seconds = time.perf_counter() - began
    began = time.perf_counter()
    found = lib.nearest.approximate_search(index, queries, 10).positions
    figures = {
        "build_seconds": round(build_seconds, 1),
        "lists": index.nlist,
        "nprobe": index.nprobe,
        "seconds_per_query": round((time.perf_counter() - began) / len(queries), 5),
        "recall_at_10": round(recall(found, exact), 3),
    }
    for share in (4, 2):
        index.nprobe = index.nlist // share
        scanned = lib.nearest.approximate_search(index, queries, 10).positions
        figures[f"recall_at_10_scanning_1/{share}_of_lists"] = round(recall(scanned, exact), 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dimension", type=int, default=512)
    args = parser.parse_args()
    report = {
        "rows": args.rows,
        "dimension": args.dimension,
        "device": lib.environment.describe_device("cpu"),
    }
    for kind in ("random", "clustered"):
        path = vectors_file(args.rows, args.dimension, kind == "clustered")
        embeddings = lib.open_embeddings(lib.workspace.Collection(path.parent), path)
        queries = near_queries(embeddings)
        if kind == "random":
            report["exact_seconds_per_query"] = round(seconds_per_query(embeddings, queries[:3], 1), 3)
            report["exact_seconds_per_query_in_batches_of_10"] = round(
                seconds_per_query(embeddings, queries[:30], 10), 3
            )
            report["peak_rss_mb"] = peak_rss_mb()
        report[f"ivf_{kind}"] = ivf_figures(embeddings, queries)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
