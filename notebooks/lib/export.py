"""04's exports: the merged file's vectors beside it, as .npy files, Parquet or clip-retrieval's layout.

Optionally through PCA, optionally in float16. Each export is streamed block by block into a temporary
file (or folder) and renamed into place when complete.

EXPORT="clip-retrieval" writes `<stem>_export/img_emb/img_emb_<k>.npy` and
`<stem>_export/metadata/metadata_<k>.parquet`, shards of EXPORT_SHARD_ROWS rows in file order: the
layout that clip-retrieval writes and that autofaiss, embedding-reader and clip-retrieval's back end read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .chunkfile import open_hdf5
from .errors import ParameterError
from .nearest import EmbeddingsFile, array_blocks
from .workspace import atomic_file, atomic_folder

DEFAULT_SHARD_ROWS = 1_000_000  # rows per clip-retrieval shard, as clip-retrieval's own inference writes


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


def export_embeddings(
    embeddings: EmbeddingsFile,
    kind: str,
    pca_dim: int | None = None,
    dtype: str = "float32",
    shard_rows: int = DEFAULT_SHARD_ROWS,
) -> list[Path]:
    """Write the file's embeddings and ids beside it as EXPORT `kind` says; return the paths written."""
    pca = fit_pca(embeddings, pca_dim) if pca_dim else None
    stem = (
        embeddings.path.stem + (f"_pca{pca_dim}" if pca else "") + ("_float16" if dtype == "float16" else "")
    )
    folder = embeddings.folder

    def transform(vectors: np.ndarray) -> np.ndarray:
        return (pca.transform(vectors) if pca else vectors).astype(dtype)

    shape = (embeddings.count, pca_dim or embeddings.dimension)
    if kind == "npy":
        written = _export_npy(embeddings, folder, stem, transform, shape, dtype)
    elif kind == "parquet":
        written = _export_parquet(embeddings, folder / f"{stem}.parquet", transform)
    else:
        export = folder / f"{stem}_export"
        written = _export_clip_retrieval(embeddings, export, transform, shape[1], dtype, shard_rows)
    if pca:
        written.append(_save_pca(pca, folder / f"{stem}_components.npz"))
    return written


def _save_pca(pca: Pca, path: Path) -> Path:
    """The PCA's mean, components and explained variance, for projecting new vectors the same way."""
    with atomic_file(path) as temporary, open(temporary, "wb") as file:
        np.savez(
            file,
            mean=pca.mean,
            components=pca.components,
            explained_variance_ratio=pca.explained_variance_ratio,
        )
    return path


def _export_npy(
    embeddings: EmbeddingsFile, folder: Path, stem: str, transform: Callable, shape: tuple, dtype: str
) -> list[Path]:
    """<stem>_embeddings.npy (N, dimension), then _image_ids.npy and _urls.npy, in file order."""
    paths = [folder / f"{stem}_{name}.npy" for name in ("embeddings", "image_ids", "urls")]
    vectors = ((start, transform(block)) for start, block in embeddings.blocks(reuse=True))
    _write_npy(paths[0], dtype, shape, vectors)
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


def _export_clip_retrieval(
    embeddings: EmbeddingsFile, export: Path, transform: Callable, dimension: int, dtype: str, shard_rows: int
) -> list[Path]:
    """img_emb/img_emb_<k>.npy and metadata/metadata_<k>.parquet, shard by shard, into `export`.

    Shard numbers are zero-padded to one width, so that the readers' sorted listings keep file order.
    """
    starts = range(0, embeddings.count, shard_rows)
    width = len(str(len(starts) - 1))
    with atomic_folder(export) as temporary:
        for name in ("img_emb", "metadata"):
            (temporary / name).mkdir()
        for shard, start in enumerate(starts):
            end, number = min(start + shard_rows, embeddings.count), f"{shard:0{width}d}"
            vectors = (
                (first - start, transform(block)) for first, block in embeddings.blocks(True, start, end)
            )
            _write_npy(
                temporary / "img_emb" / f"img_emb_{number}.npy", dtype, (end - start, dimension), vectors
            )
            pq.write_table(
                _shard_metadata(embeddings, start, end), temporary / "metadata" / f"metadata_{number}.parquet"
            )
    return [export]


def _shard_metadata(embeddings: EmbeddingsFile, start: int, end: int) -> pa.Table:
    """image_id, url and row of the file's rows [start, end), then the image table's other columns."""
    with open_hdf5(embeddings.path) as file:
        records = {
            "image_id": file["image_ids"].asstr()[start:end],
            "url": file["urls"].asstr()[start:end],
            "row": file["rows"][start:end],
        }
    details = embeddings.table_columns(records["row"])
    return pa.Table.from_pandas(pd.DataFrame(records).join(details), preserve_index=False)
