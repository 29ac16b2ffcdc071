"""04's gallery: thumbnails of the results, fetched where 02 fetched them, as HTML for the notebook.

Thumbnails are cached under .cache/thumbnails/; an image that cannot be fetched shows as such.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd

from .errors import ImageFailure
from .fetch import Fetcher
from .nearest import EmbeddingsFile
from .preprocess import decode_image
from .workspace import atomic_file, current_workspace

THUMBNAIL_SIZE = 160


def thumbnail(location: str, fetcher: Fetcher) -> bytes | None:
    """A JPEG thumbnail of the image at `location`, cached under .cache/thumbnails/; None if it fails."""
    path = current_workspace().thumbnails / (hashlib.sha256(location.encode()).hexdigest()[:24] + ".jpg")
    if path.is_file():
        return path.read_bytes()
    try:
        image = decode_image(fetcher.fetch(location)).convert("RGB")
    except ImageFailure:
        return None
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    with atomic_file(path) as temporary:
        temporary.write_bytes(buffer.getvalue())
    return buffer.getvalue()


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
    locations = embeddings.locations(results["row"].tolist(), results["url"].tolist())
    with ThreadPoolExecutor(8) as pool:
        thumbnails = list(pool.map(lambda location: thumbnail(location, fetcher), locations))
    cells = [
        _gallery_cell(record, data) for record, data in zip(results.itertuples(), thumbnails, strict=True)
    ]
    return f"<h4>{html.escape(title)}</h4><div style='display:flex;flex-wrap:wrap'>{''.join(cells)}</div>"
