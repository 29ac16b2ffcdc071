"""04's gallery: thumbnails of the results, fetched where 02 fetched them, as HTML for the notebook.

Thumbnails are cached under .cache/thumbnails/; an image that cannot be fetched shows as such.
"""

from __future__ import annotations

import base64
import hashlib
import html
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import ImageFailure
from .fetch import Fetcher
from .nearest import EmbeddingsFile
from .preprocess import decode_image
from .workspace import atomic_file, current_workspace

THUMBNAIL_SIZE = 160
FETCH_THREADS = 8  # images of the results fetched at once


def thumbnail_file(location: str, fetcher: Fetcher, size: int = THUMBNAIL_SIZE) -> Path | None:
    """The cached JPEG thumbnail (`size` pixels a side at most) of the image at `location`, or None."""
    key = location if size == THUMBNAIL_SIZE else f"{size}:{location}"
    path = current_workspace().thumbnails / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".jpg")
    if path.is_file():
        return path
    try:
        image = decode_image(fetcher.fetch(location)).convert("RGB")
    except ImageFailure:
        return None
    image.thumbnail((size, size))
    with atomic_file(path) as temporary:
        image.save(temporary, "JPEG", quality=85)
    return path


def result_thumbnails(
    embeddings: EmbeddingsFile, results: pd.DataFrame, fetcher: Fetcher, size: int = THUMBNAIL_SIZE
) -> list[Path | None]:
    """Each result's thumbnail file (see thumbnail_file), its image fetched from where 02 fetched it."""
    locations = embeddings.locations(results["row"].tolist(), results["url"].tolist())
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        return list(pool.map(lambda location: thumbnail_file(location, fetcher, size), locations))


def _gallery_cell(record: Any, data: bytes | None) -> str:
    size = THUMBNAIL_SIZE
    picture = (
        f'<img src="data:image/jpeg;base64,{base64.b64encode(data).decode()}" style="max-width:{size}px">'
        if data
        else f'<div style="width:{size}px;height:{size // 2}px">(not available)</div>'
    )
    caption = html.escape(f"#{record.rank} {record.score:.3f} {record.image_id}")
    caption = f'<figcaption style="font-size:11px">{caption}</figcaption>'
    return f'<figure style="margin:4px">{picture}{caption}</figure>'


def gallery_html(embeddings: EmbeddingsFile, results: pd.DataFrame, title: str, fetcher: Fetcher) -> str:
    """A grid of the results' thumbnails with rank, score and image_id, as HTML for the notebook.

    Each image is fetched from where 02 fetched it (see EmbeddingsFile.locations).
    """
    thumbnails = [
        path.read_bytes() if path else None for path in result_thumbnails(embeddings, results, fetcher)
    ]
    cells = [
        _gallery_cell(record, data) for record, data in zip(results.itertuples(), thumbnails, strict=True)
    ]
    return f"<h4>{html.escape(title)}</h4><div style='display:flex;flex-wrap:wrap'>{''.join(cells)}</div>"
