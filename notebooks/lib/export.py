"""04's exports: the merged file's vectors as .npy files or Parquet beside it, optionally through PCA.

Each export is streamed block by block into a temporary file and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .chunkfile import open_hdf5
from .errors import ParameterError
from .nearest import EmbeddingsFile, array_blocks
from .workspace import atomic_file


@dataclasses.dataclass(frozen=True)
class Pca:
    """A PCA fitted on a file's embeddings: vectors are centred, projected, then made unit length again."""

    mean: np.ndarray
    components: np.ndarray  # (PCA_DIM, D)
    explained_variance_ratio: np.ndarray

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        projected = ((vectors - self.mean) @ self.components.T).astype(np.float32)
        return projected / np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)


def fit_pca(embeddings: EmbeddingsFile, dimensions: int) -> Pca:
    """PCA by the covariance of all the file's embeddings, accumulated block by block in float64."""
    if dimensions > embeddings.dimension:
        raise ParameterError(
            f"PCA_DIM={dimensions} is more than the file's {embeddings.dimension} dimensions."
        )
    total = np.zeros(embeddings.dimension)
    products = np.zeros((embeddings.dimension, embeddings.dimension))
    for _, block in embeddings.blocks(reuse=True):
        block = block.astype(np.float64)
        total += block.sum(0)
        products += block.T @ block
    mean = total / embeddings.count
    covariance = products / embeddings.count - np.outer(mean, mean)
    variances, vectors = np.linalg.eigh(covariance)
    top = np.argsort(variances)[::-1][:dimensions]
    return Pca(
        mean.astype(np.float32), vectors[:, top].T.astype(np.float32), variances[top] / variances.sum()
    )


def export_embeddings(embeddings: EmbeddingsFile, kind: str, pca_dim: int | None = None) -> list[Path]:
    """Write the file's embeddings and ids as .npy files or Parquet beside it; return the paths."""
    pca = fit_pca(embeddings, pca_dim) if pca_dim else None
    stem = embeddings.path.stem + (f"_pca{pca_dim}" if pca else "")
    folder = embeddings.folder
    transform = pca.transform if pca else (lambda vectors: vectors)
    written = (
        _export_npy(embeddings, folder, stem, transform, pca_dim or embeddings.dimension)
        if kind == "npy"
        else _export_parquet(embeddings, folder / f"{stem}.parquet", transform)
    )
    if pca:
        components = folder / f"{stem}_components.npz"
        with atomic_file(components) as temporary, open(temporary, "wb") as file:
            np.savez(
                file,
                mean=pca.mean,
                components=pca.components,
                explained_variance_ratio=pca.explained_variance_ratio,
            )
        written.append(components)
    return written


def _export_npy(
    embeddings: EmbeddingsFile, folder: Path, stem: str, transform: Callable, dimension: int
) -> list[Path]:
    """<stem>_embeddings.npy (N, dimension) float32, then _image_ids.npy and _urls.npy, in file order."""
    paths = [folder / f"{stem}_{name}.npy" for name in ("embeddings", "image_ids", "urls")]
    vectors = ((start, transform(block)) for start, block in embeddings.blocks(reuse=True))
    _write_npy(paths[0], np.float32, (embeddings.count, dimension), vectors)
    with open_hdf5(embeddings.path) as file:
        for path, name in zip(paths[1:], ("image_ids", "urls"), strict=True):
            strings = file[name].asstr()
            width = max(
                (max(map(len, ids), default=1) for _, ids in array_blocks(strings, embeddings.block_rows)),
                default=1,
            )
            _write_npy(path, f"<U{width}", (len(strings),), array_blocks(strings, embeddings.block_rows))
    return paths


def _write_npy(path: Path, dtype: Any, shape: tuple, blocks: Iterable[tuple[int, np.ndarray]]) -> None:
    """A .npy file filled block by block through a memory map, renamed into place when complete."""
    with atomic_file(path) as temporary:
        array = np.lib.format.open_memmap(temporary, "w+", dtype, shape)
        for start, block in blocks:
            array[start : start + len(block)] = block
        array.flush()
        del array  # unmapped before the rename


def _export_parquet(embeddings: EmbeddingsFile, path: Path, transform: Callable) -> list[Path]:
    """One row per image: image_id, url, row, embedding (a list of float32), written block by block."""
    with atomic_file(path) as temporary, open_hdf5(embeddings.path) as file:
        writer = None
        for start, block in embeddings.blocks(reuse=True):
            end = start + len(block)
            vectors = transform(block)
            table = pa.table(
                {
                    "image_id": file["image_ids"].asstr()[start:end],
                    "url": file["urls"].asstr()[start:end],
                    "row": file["rows"][start:end],
                    "embedding": pa.FixedSizeListArray.from_arrays(vectors.reshape(-1), vectors.shape[1]),
                }
            )
            writer = writer or pq.ParquetWriter(temporary, table.schema)
            writer.write_table(table)
        if writer:
            writer.close()
    return [path]
