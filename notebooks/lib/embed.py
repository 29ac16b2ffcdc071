"""The per-chunk pipeline: fetch -> decode -> preprocess in threads while the device encodes.

`embed_chunk` turns a row range of the table into a ChunkResult (vectors, embedded and failed
rows); `retry_chunk` does the same for a finished chunk's failed rows. No file is written here.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .chunkfile import ChunkInfo, ChunkResult, Records, combine_results, read_chunk_result
from .device_jpeg import EncodedJpeg
from .errors import ImageFailure
from .fetch import Fetcher
from .model import ClipEncoder, PendingEmbeddings
from .preprocess import ImageRecipe
from .table import ImageTable


@dataclasses.dataclass
class Loaded:
    """One image after fetch and preprocessing: its pixels, or the reason it failed."""

    pixels: np.ndarray | EncodedJpeg | None  # an EncodedJpeg is decoded with its batch, on the device
    reason: str | None
    size: int


FETCH_THREADS_PER_WORKER = 4  # requests in flight per decoding thread: fetches wait on the network


def load_image(
    location: str,
    rotation: float | None,
    fetcher: Fetcher,
    recipe: ImageRecipe,
    decode_slots: threading.Semaphore | None = None,
    md5: str = "",
) -> Loaded:
    """Fetch, check, decode and preprocess one image; a failure is returned, never raised.

    With an `md5` (hex), bytes of another digest fail as "checksum mismatch": a placeholder that a
    photo site serves for a removed image, with status 200, is not embedded. Decoding waits for one
    of `decode_slots`, so fetches can outnumber the threads that decode.
    """
    size = 0
    try:
        data = fetcher.fetch(location)
        size = len(data)
        if md5 and hashlib.md5(data).hexdigest() != md5:
            raise ImageFailure("checksum mismatch")
        with decode_slots or contextlib.nullcontext():
            return Loaded(recipe(data, rotation), None, size)
    except ImageFailure as failure:
        return Loaded(None, failure.reason, size)
    except Exception as error:  # one image, whatever is wrong with it, must not stop the run
        return Loaded(None, f"error: {type(error).__name__}", size)


class ImageLoader:
    """Fetches, decodes and preprocesses images in threads, yielding them in input order.

    FETCH_THREADS_PER_WORKER x `workers` requests are in flight; at most `workers` threads decode
    and preprocess at once (Pillow and numpy release the GIL), while the caller encodes. At most
    `lookahead` images are in flight or waiting, so memory stays bounded whatever the chunk size.
    """

    def __init__(self, fetcher: Fetcher, recipe: ImageRecipe, workers: int, lookahead: int):
        slots = threading.Semaphore(workers)
        self.fetcher = fetcher
        self.recipe = recipe
        self._load = functools.partial(load_image, fetcher=fetcher, recipe=recipe, decode_slots=slots)
        self._pool = ThreadPoolExecutor(FETCH_THREADS_PER_WORKER * workers, thread_name_prefix="load")
        self._lookahead = lookahead

    def __enter__(self) -> ImageLoader:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def load(
        self, locations: Sequence[str], rotations: Sequence[float | None], md5s: Sequence[str] | None = None
    ) -> Iterator[Loaded]:
        """Each location's image, checked against its md5 ('' or None: unknown), loaded with its rotation.

        The images come in input order.
        """
        pending: collections.deque = collections.deque()
        md5s = [""] * len(locations) if md5s is None else md5s
        for location, rotation, md5 in zip(locations, rotations, md5s, strict=True):
            pending.append(self._pool.submit(self._load, location, rotation, md5=md5))
            if len(pending) >= self._lookahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _timed(items: Iterator, waits: list[float]) -> Iterator:
    """The items, with the seconds spent waiting for each appended to `waits`."""
    while True:
        began = time.perf_counter()
        item = next(items, _END)
        if item is _END:
            return
        waits.append(time.perf_counter() - began)
        yield item


_END = object()


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# Told of each batch as it is recorded: the batch's locations, and the reason each one failed (or None).
BatchObserver = Callable[[list[str], list[str | None]], None]


def embed_chunk(
    table: ImageTable,
    start: int,
    end: int,
    encoder: ClipEncoder,
    loader: ImageLoader,
    batch_size: int,
    on_batch: BatchObserver | None = None,
) -> ChunkResult:
    """Embed rows [start, end): the loader prepares images while each batch is encoded."""
    result = ChunkResult(start, end, encoder.embedding_size)
    _embed_rows(result, table, range(start, end), encoder, loader, batch_size, on_batch)
    return result


def estimated_bytes(table: ImageTable, ranges: Iterable[tuple[int, int]], embedding_size: int) -> int:
    """About how many bytes the chunk files of these row ranges will take, with a 10% margin."""
    per_row = 4 * embedding_size + 8 + 16  # the vector, the row number, HDF5's share per string
    total = 0
    for start, end in ranges:
        texts = table.columns.slice(start, end - start).select(["image_id", "url"])
        total += (end - start) * per_row + sum(column.nbytes for column in texts.columns)
    return int(total * 1.1)


def _embed_rows(
    result: ChunkResult,
    table: ImageTable,
    row_numbers: Sequence[int],
    encoder: ClipEncoder,
    loader: ImageLoader,
    batch_size: int,
    on_batch: BatchObserver | None = None,
) -> None:
    """Embed the given rows into `result`, in order, one batch queued on the device ahead."""
    began = time.perf_counter()
    columns = table.take(row_numbers)

    def finish(batch: list, embeddings: PendingEmbeddings | None) -> None:
        _record_batch(result, row_numbers, columns, batch, embeddings)
        if on_batch:
            on_batch([columns["location"][offset] for offset, _ in batch], [item.reason for _, item in batch])

    on_device = None  # the batch the device works on while the next one is stacked and queued
    loaded = loader.load(columns["location"], columns["rotation"], columns["md5"])
    for batch in _timed(_batches(enumerate(loaded), batch_size), result.image_waits):
        queued = (batch, _start_encoding([item for _, item in batch], encoder, loader.recipe))
        if on_device:
            finish(*on_device)
        on_device = queued
    if on_device:
        finish(*on_device)
    result.seconds += time.perf_counter() - began


def _start_encoding(
    items: list[Loaded], encoder: ClipEncoder, recipe: ImageRecipe
) -> PendingEmbeddings | None:
    """Stack the batch's images (decoding those left to the device) and queue them on the encoder.

    An image that fails in the stacking gets its reason here, before the batch is recorded.
    """
    ready = [item for item in items if item.reason is None]
    if not ready:
        return None
    pixels, reasons = recipe.stack([item.pixels for item in ready])
    for item, reason in zip(ready, reasons, strict=True):
        if reason is not None:
            item.pixels, item.reason = None, reason
    return encoder.start_encoding(pixels) if len(pixels) else None


def _record_batch(
    result: ChunkResult,
    row_numbers: Sequence[int],
    columns: dict,
    batch: list,
    embeddings: PendingEmbeddings | None,
) -> None:
    """Add an encoded batch's vectors, and its embedded and failed rows, to the chunk's result."""
    if embeddings is not None:
        result.vectors.append(embeddings.result())
    for offset, item in batch:
        record = (row_numbers[offset], columns["image_id"][offset], columns["url"][offset])
        if item.reason is None:
            result.embedded.append(*record)
        else:
            result.failed.append(*record)
            result.reasons.append(item.reason)
        result.fetched_bytes += item.size


def retry_chunk(
    info: ChunkInfo,
    table: ImageTable,
    encoder: ClipEncoder,
    loader: ImageLoader,
    batch_size: int,
    on_batch: BatchObserver | None = None,
) -> ChunkResult:
    """A finished chunk with its failed rows attempted again; the vectors it holds are kept as stored."""
    stored = read_chunk_result(info.path)
    retried = ChunkResult(info.start, info.end, stored.embedding_size, retried=len(stored.failed.rows))
    _embed_rows(retried, table, stored.failed.rows, encoder, loader, batch_size, on_batch)
    stored.failed, stored.reasons = Records(), []
    return combine_results(stored, retried)
