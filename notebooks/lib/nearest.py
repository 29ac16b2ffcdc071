"""04's search: the merged file read in blocks, exact or IVF top-k, and the queries' vectors.

`open_embeddings` checks the file, `query_encoder` loads the model that made it (or MODEL, refused
when its weights differ), and `search` returns the top-k positions and cosine scores of each query.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .chunkfile import attribute_value, open_hdf5
from .errors import ImageFailure, PipelineError, counted
from .fetch import Fetcher
from .model import ClipEncoder, load_encoder, recorded_commit
from .preprocess import DEFAULT_MAX_PIXELS, ImageRecipe
from .progress import progress_bar
from .settings import current_settings
from .sources import LOCATION_SCHEMES, resolve_locations
from .storage import pull
from .table import table_info, table_rows, table_values
from .workspace import (
    Collection,
    atomic_file,
    current_workspace,
    read_json,
    resolve_path,
    write_json,
)

# How far a score may be from its float32 value: a unit vector rounded to float16 has |v.v - 1| <= 2 * 2**-11
SCORE_TOLERANCES = {"float32": 1e-5, "float16": 2e-3}


@dataclasses.dataclass(frozen=True)
class EmbeddingsFile:
    """A merged file as 04 reads it: its path, size and how its vectors were made."""

    path: Path
    count: int
    dimension: int
    attrs: dict
    storage_dtype: str = "float32"  # how the file stores its vectors (STORAGE_DTYPE); read as float32

    @property
    def folder(self) -> Path:
        """The file's folder, its collection's: the one that keeps its image table, index and exports."""
        return self.path.parent

    def derived(self, suffix: str) -> Path:
        """A file made from this one, beside it: its index or an export, <stem><suffix>."""
        return self.folder / (self.path.stem + suffix)

    @property
    def score_tolerance(self) -> float:
        """How far a score may be from its float32 value (float16 storage rounds each component once)."""
        return SCORE_TOLERANCES.get(self.storage_dtype, SCORE_TOLERANCES["float32"])

    @property
    def block_rows(self) -> int:
        return max(1, current_settings().search_block_bytes // (4 * self.dimension))

    def blocks(
        self, reuse: bool = False, first: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 embeddings) of consecutive blocks of the rows [first, end), read one at a time.

        With `reuse`, every block is read into the same buffer (fresh memory per block costs more
        than the read, for a search): the caller uses each block before asking for the next.
        """
        end = self.count if end is None else end
        shared = np.empty((min(self.block_rows, end - first), self.dimension), np.float32) if reuse else None
        with open_hdf5(self.path) as file:
            for start in range(first, end, self.block_rows):
                rows = min(self.block_rows, end - start)
                buffer = shared if reuse else np.empty((rows, self.dimension), np.float32)
                file["embeddings"].read_direct(buffer, np.s_[start : start + rows], np.s_[:rows])
                yield start, buffer[:rows]

    def records(self, positions: np.ndarray) -> dict[str, list]:
        """image_id, url and row of the given positions, in that order."""
        with open_hdf5(self.path) as file:
            return {
                "image_id": _at_positions(file["image_ids"].asstr(), positions).tolist(),
                "url": _at_positions(file["urls"].asstr(), positions).tolist(),
                "row": _at_positions(file["rows"], positions).tolist(),
            }

    def position_of(self, image_id: str) -> int | None:
        """Where `image_id` is in the file, or None."""
        with open_hdf5(self.path) as file:
            for start, ids in array_blocks(file["image_ids"].asstr(), self.block_rows):
                found = np.flatnonzero(ids.astype(object) == image_id)
                if len(found):
                    return start + int(found[0])
        return None

    def first_image_id(self) -> str:
        with open_hdf5(self.path) as file:
            return file["image_ids"].asstr()[0]

    def vector(self, position: int) -> np.ndarray:
        """The embedding at `position`, as float32 whichever type the file stores."""
        with open_hdf5(self.path) as file:
            return file["embeddings"][position].astype(np.float32)

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """The embeddings at these positions, in their order, as float32."""
        with open_hdf5(self.path) as file:
            return _at_positions(file["embeddings"], positions).astype(np.float32)

    def locations(self, rows: Sequence[int], urls: Sequence[str]) -> list[str]:
        """Where 02 fetched the images of these rows, for thumbnails.

        That is the image table's `location` (an S3 key for Open Images with FETCH='s3', a relative
        path resolved as 01 resolved it) when the collection holds the table the file was made
        from; without it, the urls, relative paths taken from the repository root.
        """
        table = Collection(self.folder).table
        if not self._made_from(table):
            return resolve_locations(pd.Series(list(urls), dtype=str), str(current_workspace().root)).tolist()
        return table_values(table, "location", rows)

    def table_columns(self, rows: Sequence[int]) -> pd.DataFrame:
        """The image table's columns other than image_id and url at these rows (none without the table)."""
        table = Collection(self.folder).table
        if not self._made_from(table):
            return pd.DataFrame(index=range(len(rows)))
        others = [name for name in pq.read_schema(table).names if name not in ("image_id", "url")]
        return table_rows(table, rows, others)

    def _made_from(self, table: Path) -> bool:
        """Whether the image table at `table` is the one the file was made from (the same digest)."""
        info = table_info(table)
        return bool(info) and info["sha256"] == json.loads(self.attrs.get("source", "{}")).get("sha256")


def _at_positions(dataset: Any, positions: np.ndarray) -> np.ndarray:
    """`dataset` at these positions, in their order, read in one pass (h5py takes increasing ones only)."""
    unique, inverse = np.unique(np.asarray(positions, dtype=np.int64), return_inverse=True)
    return dataset[unique][inverse.reshape(-1)]


def array_blocks(vectors: Any, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of consecutive blocks of an array or HDF5 dataset, read one at a time."""
    for start in range(0, len(vectors), block_rows):
        yield start, vectors[start : start + block_rows]


def open_embeddings(collection: Collection, path: str | os.PathLike | None = None) -> EmbeddingsFile:
    """The merged file at `path` (None: the collection's, brought from object storage if it is there).

    A missing or foreign file is an error.
    """
    if not path:
        pull(collection, collection.merged_file)
    resolved = resolve_path(path) if path else collection.merged_file
    if not resolved.is_file():
        raise PipelineError(
            f"EMBEDDINGS file {resolved} does not exist: run 03_merge first, or fix the path."
        )
    try:
        with open_hdf5(resolved) as file:
            count, dimension = file["embeddings"].shape
            storage_dtype = str(file["embeddings"].dtype)
            attrs = {key: attribute_value(value) for key, value in file.attrs.items()}
            for name in ("image_ids", "urls", "rows"):
                if len(file[name]) != count:
                    raise KeyError(f"{name} and embeddings differ in length")
    except (OSError, KeyError, ValueError) as error:
        raise PipelineError(
            f"{resolved} is not a merged embeddings file ({error}): give EMBEDDINGS the file 03_merge wrote."
        ) from None
    if count == 0:
        reasons = counted(collections.Counter(json.loads(attrs.get("failed_by_reason", "{}"))))
        raise PipelineError(
            f"{resolved} holds no embeddings: all {attrs.get('failed', 0):,} of its images failed "
            f"({reasons}), so there is nothing to search. Its failed/ group says why each one failed; run "
            "02_embed with RETRY_FAILED=True once their sources can be reached, then 03_merge."
        )
    return EmbeddingsFile(resolved, count, dimension, attrs, storage_dtype)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Top-k positions in the file and their cosine scores, one row per query."""

    positions: np.ndarray  # (Q, k) int64
    scores: np.ndarray  # (Q, k) float32


def _top_k(scores: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of `scores`, best first; of equal scores the earlier position wins, always."""
    if scores.shape[1] > k:
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kept = np.take_along_axis(scores, keep, 1)
        cut = kept.min(axis=1, keepdims=True)
        left_out = (scores == cut).sum(1) > (kept == cut).sum(1)
        for row in np.flatnonzero(left_out):  # argpartition kept arbitrary ones of the scores at the cut
            keep[row] = _earliest_at_cut(scores[row], positions[row], k, cut[row, 0])
        scores, positions = np.take_along_axis(scores, keep, 1), np.take_along_axis(positions, keep, 1)
    order = np.lexsort((positions, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)


def _earliest_at_cut(scores: np.ndarray, positions: np.ndarray, k: int, cut: float) -> np.ndarray:
    """Indices of the k best scores of one row, taking the lowest positions among those equal to `cut`."""
    above, at = np.flatnonzero(scores > cut), np.flatnonzero(scores == cut)
    return np.concatenate([above, at[np.argsort(positions[at], kind="stable")][: k - len(above)]])


def exact_search(blocks: Iterable[tuple[int, np.ndarray]], queries: np.ndarray, top_k: int) -> SearchResult:
    """Exact top-k by inner product (cosine, for unit vectors), over blocks of (first row, vectors)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, queries.shape[-1])
    best_scores = np.zeros((len(queries), 0), np.float32)
    best_positions = np.zeros((len(queries), 0), np.int64)
    for start, block in blocks:
        scores = queries @ block.T
        positions = np.broadcast_to(np.arange(start, start + len(block)), scores.shape)
        best_scores, best_positions = _top_k(
            np.concatenate([best_scores, scores], 1), np.concatenate([best_positions, positions], 1), top_k
        )
    return SearchResult(best_positions, best_scores)


def result_table(embeddings: EmbeddingsFile, result: SearchResult, query: int = 0) -> pd.DataFrame:
    """One query's results: rank, score, image_id, url and row in the image table."""
    found = result.positions[query] >= 0
    positions, scores = result.positions[query][found], result.scores[query][found]
    table = pd.DataFrame({"rank": np.arange(1, len(positions) + 1), "score": scores})
    return table.assign(**embeddings.records(positions))


# The approximate index: FAISS's inverted file (IVF-Flat), built from the file in blocks and saved
# beside it. Search scans the `nprobe` lists nearest the query out of `nlist`.


def _ivf_path(embeddings: EmbeddingsFile) -> Path:
    return embeddings.derived(".ivf.faiss")


def _index_key(embeddings: EmbeddingsFile) -> str:
    """What the saved index was built from: the merged file's chunk digests, size and storage type."""
    stored = "" if embeddings.storage_dtype == "float32" else f":{embeddings.storage_dtype}"
    return hashlib.sha256(f"{embeddings.attrs.get('chunks')}:{embeddings.count}{stored}".encode()).hexdigest()


IVF_TRAINING_PER_LIST = 64  # vectors per list that k-means trains on (FAISS asks for 39 to 256)


def ivf_lists(count: int) -> int:
    """sqrt(N) lists (a tenth of them scanned per query), with at least 39 training vectors each."""
    return max(1, min(int(math.sqrt(count)), count // 39))


def _rows_in(block: np.ndarray, start: int, positions: np.ndarray) -> np.ndarray:
    """The rows of `block` (which starts at `start`) at the given sorted positions."""
    low, high = np.searchsorted(positions, [start, start + len(block)])
    return block[positions[low:high] - start]


def build_ivf(embeddings: EmbeddingsFile, seed: int = 0) -> Any:
    """An IVF-Flat index of the file's embeddings (inner product), trained on a sample of them."""
    import faiss

    lists = ivf_lists(embeddings.count)
    index = faiss.IndexIVFFlat(
        faiss.IndexFlatIP(embeddings.dimension), embeddings.dimension, lists, faiss.METRIC_INNER_PRODUCT
    )
    training = min(embeddings.count, IVF_TRAINING_PER_LIST * lists)
    sample = np.sort(np.random.default_rng(seed).choice(embeddings.count, training, replace=False))
    index.train(
        np.concatenate([_rows_in(block, start, sample) for start, block in embeddings.blocks(reuse=True)])
    )
    for _, block in progress_bar(
        embeddings.blocks(reuse=True),
        desc="index",
        unit="block",
        total=-(-embeddings.count // embeddings.block_rows),
    ):
        index.add(np.ascontiguousarray(block))
    index.nprobe = max(1, lists // 10)
    return index


def load_ivf(embeddings: EmbeddingsFile, mmap: bool = False) -> Any:
    """The file's IVF index: the one saved beside it when it is up to date, else built and saved.

    With `mmap`, the saved index's lists are memory-mapped rather than read into memory.
    """
    import faiss

    path, key = _ivf_path(embeddings), _index_key(embeddings)
    record = path.with_name(path.name + ".json")
    saved = read_json(record) if path.is_file() else {}
    if saved.get("key") != key:
        index = build_ivf(embeddings)
        with atomic_file(path) as temporary:
            faiss.write_index(index, str(temporary))
        saved = {"key": key, "nlist": index.nlist, "nprobe": index.nprobe}
        write_json(record, saved)
        if not mmap:
            return index
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
    index.nprobe = saved["nprobe"]
    return index


def approximate_search(index: Any, queries: np.ndarray, top_k: int) -> SearchResult:
    """Top-k from a FAISS index; a position of -1 means fewer than k vectors were found."""
    scores, positions = index.search(
        np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, index.d), top_k
    )
    return SearchResult(positions.astype(np.int64), scores)


def search(embeddings: EmbeddingsFile, queries: np.ndarray, top_k: int, index: str = "exact") -> SearchResult:
    """Top-k of each query with INDEX: 'exact' (streamed from the file) or 'ivf' (approximate)."""
    if queries.shape[-1] != embeddings.dimension:
        raise PipelineError(
            f"The queries have {queries.shape[-1]} dimensions and {embeddings.path} holds "
            f"{embeddings.dimension}: use the MODEL the file was made with (leave MODEL=None)."
        )
    top_k = min(top_k, embeddings.count)
    if index == "ivf":
        return approximate_search(load_ivf(embeddings), queries, top_k)
    return exact_search(embeddings.blocks(reuse=True), queries, top_k)


def query_encoder(
    embeddings: EmbeddingsFile, model: str | None, device: str, allow_other_model: bool = False
) -> ClipEncoder:
    """The model that embeds queries: the one that made the file (MODEL=None), or MODEL.

    A checkpoint of another revision (hub commit or weights digest) than the file records would
    compare vectors of two models: it is refused, unless `allow_other_model`.
    """
    revision = embeddings.attrs.get("model_revision")
    chosen = model or embeddings.attrs["model"]
    # the file's own hub model (MODEL=None, or the same name, as one parameter set gives every stage)
    encoder = load_encoder(chosen, device, "fp32", recorded_commit(embeddings.attrs, chosen))
    if encoder.embedding_size != embeddings.dimension:
        raise PipelineError(
            f"MODEL={chosen!r} makes {encoder.embedding_size}-d embeddings, and {embeddings.path} holds "
            f"{embeddings.dimension}-d ones (from {embeddings.attrs.get('model_id')}): leave MODEL=None."
        )
    if not (same_model(embeddings, encoder) or allow_other_model):
        now = f"{encoder.checkpoint.model_id} at revision {encoder.checkpoint.revision}"
        made = f"{embeddings.attrs.get('model_id')} at revision {revision}"
        what = (
            f"the model that made {embeddings.path} is now {now}"
            if model is None
            else f"MODEL={model!r} is {now}"
        )
        raise PipelineError(
            f"{what}, but the file was made by {made}: its scores would compare the vectors of two models. "
            "Search with the weights that made the file, or set ALLOW_OTHER_MODEL=True to search with "
            "these anyway."
        )
    return encoder


def same_model(embeddings: EmbeddingsFile, encoder: ClipEncoder) -> bool:
    """Whether `encoder` has the weights that made the file (the revision it records)."""
    return encoder.checkpoint.revision == embeddings.attrs.get("model_revision")


def describe_query_model(embeddings: EmbeddingsFile, encoder: ClipEncoder) -> str:
    """Which model embeds the queries, and whether it is the one that made the file."""
    checkpoint = encoder.checkpoint
    text = f"queries embedded by {checkpoint.model_id} (revision {checkpoint.revision}) on {encoder.device}"
    if same_model(embeddings, encoder):
        return text + ", the model that made the file"
    return (
        f"{text}: NOT the model that made the file ({embeddings.attrs.get('model_id')} at revision "
        f"{embeddings.attrs.get('model_revision')}), searched anyway as ALLOW_OTHER_MODEL=True asks"
    )


def query_label(embeddings: EmbeddingsFile, encoder: ClipEncoder, query: str, image: bool = False) -> str:
    """A query as its results name it, with a warning when another model than the file's embedded it.

    An image query that is an image_id of the file searches with its stored vector.
    """
    embedded_here = not (image and embeddings.position_of(query) is not None)
    if same_model(embeddings, encoder) or not embedded_here:
        return repr(query)
    return f"{query!r} (embedded by another model than the file's: {encoder.checkpoint.model_id})"


def image_query_vector(
    embeddings: EmbeddingsFile, query: str, encoder: ClipEncoder, fetcher: Fetcher
) -> np.ndarray:
    """IMAGE_QUERY as a vector: an image_id's stored embedding, or a path or URL embedded by `encoder`."""
    position = embeddings.position_of(query)
    if position is not None:
        return embeddings.vector(position)
    location = query if urlparse(query).scheme in LOCATION_SCHEMES else str(resolve_path(query))
    try:
        return image_vector(embeddings, encoder, fetcher.fetch(location))
    except ImageFailure as failure:
        raise PipelineError(
            f"IMAGE_QUERY={query!r} is neither an image_id of {embeddings.path} nor an image that can be "
            f"embedded ({failure.reason})."
        ) from None


def image_vector(
    embeddings: EmbeddingsFile, encoder: ClipEncoder, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """An image's bytes embedded as 02 embedded the file's images; ImageFailure when they cannot be."""
    recipe = ImageRecipe(
        encoder.preprocessing, max_pixels, exif_transpose=bool(embeddings.attrs.get("exif_transpose"))
    )
    return encoder.encode(recipe(data)[None])[0]
