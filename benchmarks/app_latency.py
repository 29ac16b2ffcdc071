"""The search app's query latency over N x D vectors, as each way of holding them answers, and text encoding.

    python benchmarks/app_latency.py                        # 1,000,000 x 512 (clustered), this machine
    python benchmarks/app_latency.py --rows 100000 --dimension 64 --text-model <MODEL>

The vectors are benchmarks/search.py's clustered file. For each way the app can hold them (float32 in
memory, the float16 copy, left in the file with the memory-mapped IVF index) it times QUERIES single
queries: `search` is the index alone (top-10), `shown` is what the app does for a query before the
thumbnails (top-40 candidates, near-duplicates hidden, ids and urls read from the file). Text
encoding (one query through the text tower of a random ViT-B/32 made by OpenAI's model code, with
OpenAI's tokenizer, on the CPU) is timed apart. Prints one JSON object of p50 and p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
from openai_checkpoint import random_openai_checkpoint
from process_stats import peak_rss_mb
from search import near_queries, vectors_file
from workload import lib

TOP_K = 10
HELD = {"float32": None, "float16": 0.75, "file": 0.0}  # memory made available, in float32 sizes


def percentiles(timed: Callable[[int], object], count: int) -> dict:
    """p50 and p95, in ms, of `timed(i)` for i in range(count), after one untimed call."""
    timed(0)
    seconds = []
    for i in range(count):
        began = time.perf_counter()
        timed(i)
        seconds.append(time.perf_counter() - began)
    p50, p95 = np.percentile(seconds, [50, 95]) * 1000
    return {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2)}


def held_index(embeddings: lib.nearest.EmbeddingsFile, held: str) -> lib.vector_index.VectorIndex:
    """The app's index as it holds the vectors with the memory that HELD[held] makes available."""
    share = HELD[held]
    if share is None:
        return lib.vector_index.hold_vectors(embeddings)
    float32_bytes = 4 * embeddings.count * embeddings.dimension
    return lib.vector_index.hold_vectors(
        embeddings, available=share * float32_bytes / lib.vector_index.MEMORY_SHARE
    )


def query_figures(index: lib.vector_index.VectorIndex, queries: np.ndarray) -> dict:
    """Latency of the index alone and of the app's results, for single queries in the index's mode."""
    mode = index.default_mode
    search = percentiles(lambda i: index.search(queries[i], TOP_K, mode), len(queries))
    shown = percentiles(
        lambda i: lib.subset.shown_results(index, queries[i][None], TOP_K, mode, True), len(queries)
    )
    return {"mode": mode, "described": index.describe(), "search": search, "shown": shown}


def text_figures(model: str, count: int) -> dict:
    """Latency of one text query through the model's text tower, on the CPU."""
    encoder = lib.load_encoder(model, "cpu", "fp32")
    texts = [f"a photo of a {word}" for word in ("dog", "cat", "city street at night", "red car", "beach")]
    return {
        "model": encoder.checkpoint.model_id,
        **percentiles(lambda i: encoder.encode_text([texts[i % 5]]), count),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dimension", type=int, default=512)
    parser.add_argument("--text-model", help="MODEL as 02 takes it (default: a random OpenAI ViT-B/32)")
    args = parser.parse_args()
    path = vectors_file(args.rows, args.dimension, clustered=True)
    embeddings = lib.open_embeddings(lib.workspace.Collection(path.parent), path)
    queries = near_queries(embeddings)
    report = {
        "rows": args.rows,
        "dimension": args.dimension,
        "device": lib.environment.describe_device("cpu"),
    }
    for held in HELD:
        began = time.perf_counter()
        index = held_index(embeddings, held)
        if held == "file":
            index.search(queries[0], TOP_K, "ivf")  # builds (or loads) and memory-maps the saved index
        report[held] = {
            "load_seconds": round(time.perf_counter() - began, 1),
            **query_figures(index, queries),
        }
        del index
    report["text_encoding"] = text_figures(args.text_model or str(random_openai_checkpoint("state dict")), 50)
    report["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
