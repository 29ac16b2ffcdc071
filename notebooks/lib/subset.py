"""04's app: the results a search shows (near-duplicates of a higher one hidden), and those as a ZIP.

The ZIP holds each shown image as it was fetched (through the fetch seam, from where 02 fetched it)
and results.csv: rank, score, image_id, url, row, the file's name in the ZIP (or why it is missing),
and the image table's other columns.
"""

from __future__ import annotations

import io
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from .display import FETCH_THREADS
from .errors import ImageFailure
from .fetch import Fetcher
from .nearest import EmbeddingsFile, SearchResult, result_table
from .vector_index import VectorIndex
from .workspace import atomic_file

NEAR_DUPLICATE_SCORE = 0.97  # cosine to a higher result from which a result is a near-duplicate
CANDIDATES_PER_RESULT = 4  # searched per result shown, so that hidden near-duplicates leave TOP_K


def shown_results(
    index: VectorIndex, queries: np.ndarray, top_k: int, mode: str, hide_near_duplicates: bool
) -> tuple[pd.DataFrame, int]:
    """The top_k results of one query (rank, score, image_id, url, row), and how many were hidden.

    The table's index is each result's position in the file.
    """
    searched = top_k * CANDIDATES_PER_RESULT if hide_near_duplicates else top_k
    result = index.search(queries, searched, mode)
    found = result.positions[0] >= 0
    positions, scores = result.positions[0][found], result.scores[0][found]
    if hide_near_duplicates:
        kept, hidden = _distinct(index.vectors_at(positions), top_k)
    else:
        kept, hidden = np.arange(min(top_k, len(positions))), 0
    shown = SearchResult(positions[kept][None], scores[kept][None])
    table = result_table(index.embeddings, shown)
    return table.set_index(pd.Index(positions[kept], name="position")), hidden


def _distinct(vectors: np.ndarray, wanted: int) -> tuple[np.ndarray, int]:
    """Indices of the first `wanted` vectors that are no near-duplicate of an earlier kept one.

    Also how many near-duplicates were passed over on the way.
    """
    kept: list[int] = []
    hidden = 0
    for candidate, vector in enumerate(vectors):
        if len(kept) == wanted:
            break
        if kept and float(np.max(vectors[kept] @ vector)) >= NEAR_DUPLICATE_SCORE:
            hidden += 1
        else:
            kept.append(candidate)
    return np.asarray(kept, dtype=np.int64), hidden


def results_zip(embeddings: EmbeddingsFile, shown: pd.DataFrame, fetcher: Fetcher, path: Path) -> Path:
    """Write the shown images and results.csv into a ZIP at `path`; return it."""
    locations = embeddings.locations(shown["row"].tolist(), shown["url"].tolist())
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        fetched = list(pool.map(lambda location: _fetched(fetcher, location), locations))
    names, missing = [], []
    with atomic_file(path) as temporary, zipfile.ZipFile(temporary, "w") as archive:
        for record, (data, reason) in zip(shown.itertuples(), fetched, strict=True):
            name = f"images/{record.rank:03d}_{_file_stem(record.image_id)}{_extension(data)}" if data else ""
            if data:
                archive.writestr(name, data, compress_type=zipfile.ZIP_STORED)
            names.append(name)
            missing.append(reason)
        details = embeddings.table_columns(shown["row"].tolist())
        table = shown.assign(file=names, missing=missing).join(details.set_index(shown.index))
        archive.writestr("results.csv", table.to_csv(index=False), compress_type=zipfile.ZIP_DEFLATED)
    return path


def _fetched(fetcher: Fetcher, location: str) -> tuple[bytes | None, str]:
    """An image's bytes and '', or None and why it could not be fetched."""
    try:
        return fetcher.fetch(location), ""
    except ImageFailure as failure:
        return None, failure.reason


def _file_stem(image_id: str) -> str:
    """An image_id as a file name: characters other than letters, digits, '.', '-' and '_' become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", image_id).lstrip(".")[:100] or "image"


def _extension(data: bytes) -> str:
    """The file extension of an image's format (.jpg, .png, ...), read from its header; .bin if unknown."""
    try:
        image_format = Image.open(io.BytesIO(data)).format or ""
    except (UnidentifiedImageError, OSError, ValueError):
        return ".bin"
    return {"JPEG": ".jpg", "": ".bin"}.get(image_format, f".{image_format.lower()}")
