"""04's app: the file's vectors held in memory for queries as fast as typing, or its IVF index.

`hold_vectors` keeps the embeddings in memory as float32 when they fit in half the memory available,
as a float16 copy (FAISS's scalar quantizer, scored in float32) when only that fits, and else leaves
them in the file: 'exact' then streams the file and 'ivf' memory-maps the saved index.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import psutil

from .nearest import EmbeddingsFile, SearchResult, approximate_search, exact_search, load_ivf, search
from .progress import progress_bar

MEMORY_SHARE = 0.5  # of the memory available when the app starts, at most, for the held vectors


@dataclasses.dataclass
class VectorIndex:
    """The file's vectors as the app searches them: `held` is 'float32', 'float16' or 'file'."""

    embeddings: EmbeddingsFile
    held: str
    vectors: np.ndarray | None = None  # (N, D) float32, when held='float32'
    float16: Any = None  # a FAISS IndexScalarQuantizer (fp16), when held='float16'

    def describe(self) -> str:
        """How the vectors are held, for the app's status line."""
        size = f"{self.embeddings.count:,} x {self.embeddings.dimension}"
        return {
            "float32": f"{size} vectors held in memory (float32)",
            "float16": f"{size} vectors held in memory as float16 (float32 did not fit)",
            "file": f"{size} vectors left in the file (not even float16 fits in memory): use the IVF index",
        }[self.held]

    @property
    def default_mode(self) -> str:
        """'exact' when the vectors are held, else 'ivf'."""
        return "ivf" if self.held == "file" else "exact"

    def search(self, queries: np.ndarray, top_k: int, mode: str = "exact") -> SearchResult:
        """Top-k of each query: 'exact' over the held vectors (or the file), or 'ivf' (approximate)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.embeddings.dimension)
        top_k = min(top_k, self.embeddings.count)
        if mode == "ivf":
            return approximate_search(self._ivf, queries, top_k)
        if self.held == "float32":
            return exact_search([(0, self.vectors)], queries, top_k)
        if self.held == "float16":
            return approximate_search(self.float16, queries, top_k)
        return search(self.embeddings, queries, top_k)

    def vectors_at(self, positions: np.ndarray) -> np.ndarray:
        """The float32 vectors at these positions of the file."""
        if self.held == "float32":
            return self.vectors[positions]
        if self.held == "float16":
            return np.stack([self.float16.reconstruct(int(position)) for position in positions])
        return self.embeddings.vectors(positions)

    @functools.cached_property
    def _ivf(self) -> Any:
        """The saved IVF index (built at first use), memory-mapped when the vectors are not held."""
        return load_ivf(self.embeddings, mmap=self.held == "file")


def hold_vectors(embeddings: EmbeddingsFile, available: int | None = None) -> VectorIndex:
    """The file's vectors in memory as float32 or float16, whichever fits in MEMORY_SHARE of `available`.

    `available` defaults to the memory available to this machine now.
    """
    budget = MEMORY_SHARE * (psutil.virtual_memory().available if available is None else available)
    float32_bytes = 4 * embeddings.count * embeddings.dimension
    if float32_bytes <= budget:
        return VectorIndex(embeddings, "float32", vectors=_read_all(embeddings))
    if float32_bytes / 2 <= budget:
        return VectorIndex(embeddings, "float16", float16=_float16_index(embeddings))
    return VectorIndex(embeddings, "file")


def _blocks_with_progress(embeddings: EmbeddingsFile) -> Any:
    total = -(-embeddings.count // embeddings.block_rows)
    return progress_bar(embeddings.blocks(reuse=True), desc="load vectors", unit="block", total=total)


def _read_all(embeddings: EmbeddingsFile) -> np.ndarray:
    vectors = np.empty((embeddings.count, embeddings.dimension), np.float32)
    for start, block in _blocks_with_progress(embeddings):
        vectors[start : start + len(block)] = block
    return vectors


def _float16_index(embeddings: EmbeddingsFile) -> Any:
    import faiss

    index = faiss.IndexScalarQuantizer(
        embeddings.dimension, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    for _, block in _blocks_with_progress(embeddings):
        index.add(np.ascontiguousarray(block))
    return index
