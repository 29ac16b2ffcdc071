"""How much float16 storage (STORAGE_DTYPE="float16") changes 04's top-10, against float32 storage.

    python benchmarks/storage_dtype.py                           # 400 photos, 100,000 clustered vectors
    python benchmarks/storage_dtype.py --photos 1000 --rows 1000000
    python benchmarks/storage_dtype.py --embeddings OUTPUT/Images_Embedded.h5   # a float32 file of yours

Two sets of vectors, each searched as stored in float32 and in float16 (scores computed in float32,
as 04 does):
  photos     synthetic photos embedded by 02 with a random model of ViT-B/32's shape, merged by 03
             once as float32 and once as float16; every image is a query (image -> image search)
  clustered  benchmarks/search.py's clustered 512-d unit vectors (close neighbours, as photos of one
             scene have), with QUERIES queries near them (as text and image queries are near images);
             or, with --embeddings, the vectors of that file with queries near them
Prints one JSON object per set: the mean share of the float32 top-10 that float16 also finds, the
share of queries whose top-10 is the same list in the same order, the same top-1, the largest
difference of a score, and the merged files' sizes (photos).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from embed_folder import embed_params
from search import QUERIES, near_queries, vectors_file
from workload import embed_rows, lib, model_path, photo_folder, temporary_workspace

TOP_K = 10


def agreement(float32: lib.nearest.SearchResult, float16: lib.nearest.SearchResult) -> dict:
    """How far the float16 top-k is from the float32 one, query by query."""
    shared = [
        len(set(a) & set(b)) / len(a) for a, b in zip(float32.positions, float16.positions, strict=True)
    ]
    same_order = np.all(float32.positions == float16.positions, axis=1)
    return {
        "queries": len(shared),
        "top10_overlap": round(float(np.mean(shared)), 4),
        "same_top10_in_order": round(float(np.mean(same_order)), 4),
        "same_top1": round(float(np.mean(float32.positions[:, 0] == float16.positions[:, 0])), 4),
        "max_score_difference": float(np.max(np.abs(float32.scores - float16.scores))),
    }


def stored_as_float16(vectors: np.ndarray) -> np.ndarray:
    """What a float16 file gives back to 04: the float32 vectors rounded once, read as float32."""
    return vectors.astype(np.float16).astype(np.float32)


def search_arrays(vectors: np.ndarray, queries: np.ndarray) -> lib.nearest.SearchResult:
    return lib.nearest.exact_search(lib.nearest.array_blocks(vectors, 50_000), queries, TOP_K)


def photo_figures(count: int, model: str) -> dict:
    """02 and 03 over `count` synthetic photos; the float32 and float16 files searched with every vector."""
    folder = photo_folder(count)
    with temporary_workspace():
        params = lib.MetadataParams("folder", "validation", str(folder), "s3")
        collection = lib.collection()
        lib.save_image_table(lib.build_image_table(params), params, collection)
        table = lib.load_image_table(collection)
        encoder = lib.load_encoder(model, "cpu", "fp32")
        run = {"model": model, "device": "cpu", "precision": "fp32", "preprocess": "exact"}
        embed = embed_params(
            argparse.Namespace(**run, batch_size="auto", workers="auto", chunk=max(1, count // 4))
        )
        embed_rows(table, encoder, lib.with_machine_sizes(embed, encoder))
        files = {
            dtype: lib.open_embeddings(
                collection, lib.merge_chunks(collection, f"OUTPUT/{dtype}.h5", False, dtype).path
            )
            for dtype in ("float32", "float16")
        }
        queries = np.concatenate([vectors for _, vectors in files["float32"].blocks()])
        results = {dtype: lib.search(embeddings, queries, TOP_K) for dtype, embeddings in files.items()}
        file_sizes = {
            f"{dtype}_file_bytes": embeddings.path.stat().st_size for dtype, embeddings in files.items()
        }
    return {
        "images": count,
        "model": encoder.checkpoint.model_id,
        **agreement(*results.values()),
        **file_sizes,
    }


def vector_figures(path: Path) -> dict:
    """A float32 file's vectors, and their float16 rounding, searched with QUERIES queries near them."""
    embeddings = lib.open_embeddings(lib.workspace.Collection(path.parent), path)
    vectors = np.concatenate([block for _, block in embeddings.blocks()])
    queries = near_queries(embeddings)
    float32, float16 = (search_arrays(held, queries) for held in (vectors, stored_as_float16(vectors)))
    return {"rows": embeddings.count, "dimension": embeddings.dimension, **agreement(float32, float16)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--model", default="random", help="MODEL for the photos ('random': ViT-B/32's shape)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--embeddings", type=Path, help="a float32 merged file to measure instead of clustered"
    )
    args = parser.parse_args()
    report = {
        "photos": photo_figures(args.photos, model_path(args.model)),
        "clustered": vector_figures(args.embeddings or vectors_file(args.rows, 512, clustered=True)),
        "queries_near_vectors": QUERIES,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
