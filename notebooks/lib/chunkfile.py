"""The chunk file: one HDF5 file per row range, the unit that 02 writes and 03 merges.

Records, attributes, the signature that chunks of one output share, and reading and writing, with
HDF5's own file-lock errors told plainly. The layout is the merged file's (README, Output format).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import PipelineError
from .workspace import atomic_file

FORMAT_VERSION = 2  # 2: orientation options and the pixel limit in every file


CHUNK_NAME = re.compile(r"chunk_(\d{9})_(\d{9})\.h5")
SIGNATURE_KEYS = (  # model_id is recorded but not compared: a local checkpoint may move
    "model_revision",
    "embedding_size",
    "image_size",
    "image_mean",
    "image_std",
    "preprocessing",
    "preprocess",
    "exif_transpose",
    "apply_rotation",
    "precision",
    "storage_dtype",
    "table_sha256",
)
SIGNATURE_DEFAULTS = {"storage_dtype": "float32"}  # what files written before an attribute existed hold
STRING_DTYPE = h5py.string_dtype("utf-8")


def chunk_path(folder: Path, start: int, end: int) -> Path:
    """Chunks are named by their global row range, so a sorted listing is in row order."""
    return folder / f"chunk_{start:09d}_{end:09d}.h5"


@dataclasses.dataclass
class Records:
    """Rows of the output format: embedded images, or failed ones with their reasons."""

    rows: list[int] = dataclasses.field(default_factory=list)
    image_ids: list[str] = dataclasses.field(default_factory=list)
    urls: list[str] = dataclasses.field(default_factory=list)

    def append(self, row: int, image_id: str, url: str) -> None:
        self.rows.append(row)
        self.image_ids.append(image_id)
        self.urls.append(url)

    def __add__(self, other: Records) -> Records:
        return Records(self.rows + other.rows, self.image_ids + other.image_ids, self.urls + other.urls)

    def reordered(self, order: Sequence[int]) -> Records:
        """The records at positions `order`."""
        columns = (self.rows, self.image_ids, self.urls)
        return Records(*([column[index] for index in order] for column in columns))


@dataclasses.dataclass
class ChunkResult:
    """Everything 02 learnt about rows [start, end), gathered batch by batch."""

    start: int
    end: int
    embedding_size: int
    embedded: Records = dataclasses.field(default_factory=Records)
    failed: Records = dataclasses.field(default_factory=Records)
    reasons: list[str] = dataclasses.field(default_factory=list)
    vectors: list[np.ndarray] = dataclasses.field(default_factory=list)
    fetched_bytes: int = 0
    seconds: float = 0.0
    retried: int = 0  # failed rows attempted again (RETRY_FAILED)
    image_waits: list[float] = dataclasses.field(default_factory=list)  # per batch: seconds the model waited

    def embeddings(self) -> np.ndarray:
        if not self.vectors:
            return np.zeros((0, self.embedding_size), np.float32)
        return np.concatenate(self.vectors)

    def stats(self) -> dict:
        """Per-chunk statistics, stored in the chunk file."""
        return {
            "attempted": self.end - self.start,
            "embedded": len(self.embedded.rows),
            "failed": len(self.failed.rows),
            "failed_by_reason": dict(collections.Counter(self.reasons).most_common()),
            "bytes": self.fetched_bytes,
            "seconds": round(self.seconds, 3),
            "waited_seconds": round(sum(self.image_waits), 3),
            "retried": self.retried,
        }


@dataclasses.dataclass(frozen=True)
class ChunkInfo:
    """A finished chunk file, from its attributes."""

    path: Path
    start: int
    end: int
    embedded: int
    failed: int
    attrs: dict

    @property
    def signature(self) -> dict:
        return signature_of(self.attrs)


def attribute_value(value: Any) -> Any:
    """An HDF5 attribute as plain Python, so attributes compare and print cleanly."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def records_digest(rows: np.ndarray, embeddings: np.ndarray, image_ids: Sequence, urls: Sequence) -> str:
    """A digest of embedded records; merge recomputes it to verify every copied chunk."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes())
    for text in (*image_ids, *urls):
        digest.update((text.decode() if isinstance(text, bytes) else text).encode() + b"\0")
    return digest.hexdigest()


def _write_records(group: h5py.Group, records: Records) -> None:
    count = len(records.rows)
    group.create_dataset("urls", data=records.urls, dtype=STRING_DTYPE, shape=(count,))
    group.create_dataset("image_ids", data=records.image_ids, dtype=STRING_DTYPE, shape=(count,))
    group.create_dataset("rows", data=np.asarray(records.rows, dtype=np.int64))


def write_chunk(path: Path, result: ChunkResult, attrs: dict) -> None:
    """Write a chunk to a temporary name, then rename: a file with the final name is always whole.

    The vectors are stored as the attributes' storage_dtype (float32 or float16).
    """
    embeddings = result.embeddings().astype(signature_of(attrs)["storage_dtype"])
    embedded = result.embedded
    with atomic_file(path) as temporary, open_hdf5(temporary, "w") as file:
        _write_records(file, embedded)
        file.create_dataset("embeddings", data=embeddings)
        failed = file.create_group("failed")
        _write_records(failed, result.failed)
        failed.create_dataset(
            "reasons", data=result.reasons, dtype=STRING_DTYPE, shape=(len(result.reasons),)
        )
        file.attrs.update(attrs)
        file.attrs.update({"start": result.start, "end": result.end, "stats": json.dumps(result.stats())})
        file.attrs["digest"] = records_digest(embedded.rows, embeddings, embedded.image_ids, embedded.urls)


def _read_records(group: h5py.Group) -> Records:
    return Records(
        group["rows"][:].tolist(), group["image_ids"].asstr()[:].tolist(), group["urls"].asstr()[:].tolist()
    )


def read_chunk_result(path: Path) -> ChunkResult:
    """A chunk file's records, vectors and statistics, as 02 gathered them."""
    with open_hdf5(path) as file:
        stats = json.loads(file.attrs["stats"])
        embeddings = file["embeddings"][:]
        return ChunkResult(
            int(file.attrs["start"]),
            int(file.attrs["end"]),
            embeddings.shape[1],
            _read_records(file),
            _read_records(file["failed"]),
            file["failed/reasons"].asstr()[:].tolist(),
            [embeddings],
            stats["bytes"],
            stats["seconds"],
            stats.get("retried", 0),
        )


def combine_results(first: ChunkResult, second: ChunkResult) -> ChunkResult:
    """The records of a stored chunk and of a retry of its failed rows, in row order.

    `retried` is the retry's own count (the rows it attempted), not a sum over earlier retries.
    """
    embedded, failed = first.embedded + second.embedded, first.failed + second.failed
    by_row, failed_by_row = np.argsort(embedded.rows), np.argsort(failed.rows)
    reasons = first.reasons + second.reasons
    return ChunkResult(
        first.start,
        first.end,
        first.embedding_size,
        embedded.reordered(by_row),
        failed.reordered(failed_by_row),
        [reasons[index] for index in failed_by_row],
        [np.concatenate([first.embeddings(), second.embeddings()])[by_row]],
        first.fetched_bytes + second.fetched_bytes,
        first.seconds + second.seconds,
        second.retried,
        second.image_waits,
    )


_HDF5_LOCK_ERROR = re.compile(r"unable to lock file, errno = (\d+)")
_NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)


def open_hdf5(path: Path, mode: str = "r") -> h5py.File:
    """Open an HDF5 file; HDF5's own file lock failing is a clear error, whichever way it fails.

    EAGAIN: another process holds the file open for writing. ENOSYS or ENOLCK: the filesystem has
    no locks (NFS without a lock daemon, some FUSE mounts), and HDF5 must be told not to lock.
    """
    try:
        return h5py.File(path, mode)
    except OSError as error:
        locked = _HDF5_LOCK_ERROR.search(str(error))
        if locked is None:
            raise
        number = int(locked.group(1))
        if number in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise PipelineError(
                f"{path} is locked: another process (a notebook kernel or script) holds it open for "
                "writing. Close it there (f.close(), or restart that kernel), then run this stage again."
            ) from None
        if number in _NO_LOCKS:
            raise PipelineError(
                f"Cannot open {path}: its filesystem does not support the file locks HDF5 takes "
                f"({os.strerror(number)}). Set the environment variable HDF5_USE_FILE_LOCKING=FALSE (export "
                "it before starting Jupyter or papermill, or run os.environ['HDF5_USE_FILE_LOCKING'] = "
                "'FALSE' in the notebook first), then run this stage again."
            ) from None
        raise


def read_chunk_info(path: Path) -> ChunkInfo:
    """The attributes and sizes of a chunk file; an unreadable one is an error that names it."""
    try:
        with open_hdf5(path) as file:
            attrs = {key: attribute_value(value) for key, value in file.attrs.items()}
            embedded, failed = len(file["rows"]), len(file["failed/rows"])
    except (OSError, KeyError) as error:
        raise PipelineError(
            f"The chunk file {path} cannot be read ({error}): it is damaged. Delete it and run "
            "02_embed again for its rows."
        ) from None
    if attrs.get("format_version") != FORMAT_VERSION:
        raise PipelineError(
            f"The chunk file {path} is in format {attrs.get('format_version')}, from another version of "
            f"this pipeline (this one writes format {FORMAT_VERSION}). Move it aside and run 02_embed "
            "again for its rows."
        )
    return ChunkInfo(path, int(attrs["start"]), int(attrs["end"]), embedded, failed, attrs)


def find_chunks(folder: Path) -> list[ChunkInfo]:
    """The finished chunk files in `folder`, in row order."""
    return [read_chunk_info(path) for path in chunk_files(folder)]


def chunk_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("chunk_*.h5") if CHUNK_NAME.fullmatch(path.name))


def signature_of(attrs: dict) -> dict:
    """What chunks must share to be merged into one file, from their attributes."""
    return {key: attrs.get(key, SIGNATURE_DEFAULTS.get(key)) for key in SIGNATURE_KEYS}


_SIGNATURE_PARAMETERS = {  # what sets each part of the signature
    "model_revision": "MODEL, MODEL_REVISION",
    "embedding_size": "MODEL",
    "image_size": "MODEL",
    "image_mean": "MODEL",
    "image_std": "MODEL",
    "preprocessing": "the preprocessing rule (of another version of this pipeline)",
    "preprocess": "PREPROCESS",
    "exif_transpose": "EXIF_TRANSPOSE",
    "apply_rotation": "APPLY_ROTATION",
    "precision": "PRECISION",
    "storage_dtype": "STORAGE_DTYPE",
    "table_sha256": "the image table (01_metadata's DATASET, SPLIT, SOURCE, FETCH)",
}


def describe_difference(first: dict, second: dict, labels: tuple[str, str]) -> str:
    """Each parameter that differs between two chunk attribute sets, with its value in each."""
    differing: dict[str, str] = {}
    first_signature, second_signature = signature_of(first), signature_of(second)
    for key in SIGNATURE_KEYS:
        if first_signature[key] != second_signature[key]:
            differing.setdefault(_SIGNATURE_PARAMETERS[key], key)
    return "; ".join(
        f"{name}: {_shown(key, first)} {labels[0]}, {_shown(key, second)} {labels[1]}"
        for name, key in differing.items()
    )


def _shown(key: str, attrs: dict) -> str:
    """A signature value as a person recognises it: the model by its id, the table by its source."""
    value = signature_of(attrs)[key]
    if key == "table_sha256":
        source = json.loads(attrs.get("source") or "{}")
        return f"{source.get('dataset')} {source.get('source')!r} (sha256 {str(value)[:12]})"
    if _SIGNATURE_PARAMETERS[key].startswith("MODEL"):
        return f"{attrs.get('model_id')} ({key} {value!r})"
    return repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
