"""03: chunk files -> one verified file, streamed in row order with memory bounded by one chunk.

The merged file keeps the original notebook's datasets (urls, embeddings, image_ids, rows) and the
failed group; it replaces an older one only once every chunk's digest is reproduced. Its vectors
are stored as STORAGE_DTYPE: float32 chunks may be stored as float16, never float16 ones as float32.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .chunkfile import (
    FORMAT_VERSION,
    STRING_DTYPE,
    ChunkInfo,
    attribute_value,
    describe_difference,
    find_chunks,
    open_hdf5,
    read_chunk_info,
    records_digest,
)
from .claims import FileLock, claimed, lock_holder, lock_path, remove_stale_files
from .errors import PipelineError
from .progress import progress_bar
from .storage import delete_chunks, lease, pull, push, sync_chunks
from .workspace import (
    Collection,
    atomic_file,
    check_free_space,
    check_writable,
    resolve_path,
    temporary_path,
)

NORM_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """What the merged file holds."""

    path: Path
    embedded: int
    failed: int
    failed_by_reason: dict
    chunks: int
    gaps: list[tuple[int, int]]
    written: bool
    kept: list[str] = dataclasses.field(default_factory=list)  # chunk files CLEANUP had to leave

    def __str__(self) -> str:
        lines = [
            f"{self.path}: {self.embedded:,} embeddings, {self.failed:,} failed images, "
            f"from {self.chunks} chunk file(s)" + ("" if self.written else " (already up to date)")
        ]
        lines += [f"  failed, {reason}: {count:,}" for reason, count in self.failed_by_reason.items()]
        if self.gaps:
            missing = sum(end - start for start, end in self.gaps)
            ranges = ", ".join(f"[{start}, {end})" for start, end in self.gaps[:10])
            more = " ..." if len(self.gaps) > 10 else ""
            lines.append(
                f"  rows never processed: {missing:,}, in {ranges}{more}; "
                "run 02_embed with START and END covering them"
            )
        if self.kept:
            lines.append(
                f"  kept {len(self.kept)} chunk file(s) that another run was rewriting or rewrote after "
                f"they were merged (e.g. {self.kept[0]}, by RETRY_FAILED): the file holds their earlier "
                "version; merge them into another OUTPUT_FILE for their newer rows in a file of their own"
            )
        return "\n".join(lines)


def _check_chunks_agree(chunks: list[ChunkInfo]) -> None:
    """All chunks come from one model, preprocessing, precision and table, and none overlap."""
    first = chunks[0]
    for info in chunks[1:]:
        if info.signature != first.signature:
            raise PipelineError(
                f"{info.path.name} and {first.path.name} were made differently "
                f"({describe_difference(first.attrs, info.attrs, (first.path.name, info.path.name))}): "
                "they cannot be merged into one file. Remove the chunks of one of the runs from "
                f"{info.path.parent}."
            )
    for before, after in itertools.pairwise(chunks):
        if after.start < before.end:
            raise PipelineError(
                f"{before.path.name} and {after.path.name} overlap (rows [{after.start}, "
                f"{min(before.end, after.end)})): delete one of them, then merge again."
            )


def find_gaps(chunks: list[ChunkInfo], rows: int) -> list[tuple[int, int]]:
    """Row ranges of the image table that no chunk covers."""
    gaps, cursor = [], 0
    for info in chunks:
        if info.start > cursor:
            gaps.append((cursor, info.start))
        cursor = max(cursor, info.end)
    if cursor < rows:
        gaps.append((cursor, rows))
    return gaps


def _check_chunk_records(source: h5py.File, info: ChunkInfo, dimension: int) -> None:
    """Datasets of matching shapes, rows increasing inside the chunk's range, unit-length embeddings."""
    shapes = {name: source[name].shape for name in ("rows", "image_ids", "urls", "embeddings")}
    shapes.update(
        {f"failed/{name}": source["failed"][name].shape for name in ("image_ids", "urls", "reasons")}
    )
    expected = {name: (info.failed,) if name.startswith("failed/") else (info.embedded,) for name in shapes}
    expected["embeddings"] = (info.embedded, dimension)
    if shapes != expected:
        raise PipelineError(
            f"{info.path}: its datasets do not fit together ({shapes}). Delete the file and run "
            "02_embed for its rows."
        )
    rows = source["rows"][:]
    if np.any(np.diff(rows) <= 0) or (len(rows) and (rows[0] < info.start or rows[-1] >= info.end)):
        raise PipelineError(f"{info.path}: its rows are not increasing within [{info.start}, {info.end}).")
    norms = np.linalg.norm(source["embeddings"][:].astype(np.float32), axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (np.abs(norms - 1) > NORM_TOLERANCE))
    if len(bad):
        raise PipelineError(
            f"{info.path}: {len(bad)} embedding(s) are not of unit length (e.g. row "
            f"{rows[bad[0]]}, norm {norms[bad[0]]}). Delete the file and run 02_embed for its rows."
        )


def _create_merged_datasets(file: h5py.File, embedded: int, failed: int, attrs: dict) -> None:
    shape = (embedded, int(attrs["embedding_size"]))
    file.create_dataset("embeddings", shape=shape, dtype=attrs["storage_dtype"])
    for group, count in ((file, embedded), (file.create_group("failed"), failed)):
        group.create_dataset("urls", shape=(count,), dtype=STRING_DTYPE)
        group.create_dataset("image_ids", shape=(count,), dtype=STRING_DTYPE)
        group.create_dataset("rows", shape=(count,), dtype=np.int64)
    file["failed"].create_dataset("reasons", shape=(failed,), dtype=STRING_DTYPE)


def _copy_records(source: h5py.Group, target: h5py.Group, names: Sequence[str], offset: int) -> None:
    count = len(source["rows"])
    for name in names:
        target[name][offset : offset + count] = source[name][:]


def _copy_embeddings(source: h5py.File, target: h5py.File, info: ChunkInfo, offset: int) -> str:
    """Copy a chunk's vectors as the merged file stores them; return the digest its segment must have.

    That is the chunk's own digest, unless its float32 vectors are stored as float16: then the
    chunk is checked against its digest here, and the segment must give the digest of the float16 ones.
    """
    vectors = source["embeddings"][:]
    stored = vectors.astype(target["embeddings"].dtype)
    target["embeddings"][offset : offset + len(stored)] = stored
    if stored.dtype == vectors.dtype:
        return info.attrs["digest"]
    records = [source[name][:] for name in ("rows", "image_ids", "urls")]
    if records_digest(records[0], vectors, *records[1:]) != info.attrs["digest"]:
        raise PipelineError(
            f"{info.path} does not reproduce its own digest: it is damaged. Nothing was replaced; delete "
            "it, run 02_embed for its rows, then merge again."
        )
    return records_digest(records[0], stored, *records[1:])


def _verify_merged(path: Path, chunks: list[ChunkInfo], digests: list[str]) -> None:
    """Re-read the merged file: each chunk's segment must reproduce the digest of its vectors as stored."""
    with open_hdf5(path) as file:
        offset = 0
        for info, expected in zip(chunks, digests, strict=True):
            segment = slice(offset, offset + info.embedded)
            digest = records_digest(
                file["rows"][segment],
                file["embeddings"][segment],
                file["image_ids"][segment],
                file["urls"][segment],
            )
            if digest != expected:
                raise PipelineError(
                    f"The merged file does not reproduce {info.path} (digest mismatch): the chunk "
                    "or the disk is damaged. Nothing was replaced; delete that chunk, run 02_embed "
                    "for its rows, then merge again."
                )
            offset += info.embedded


def _distinct(chunks: list[ChunkInfo], key: str) -> Any:
    """An attribute's value when every chunk has the same one, else a JSON list of the values."""
    values = list(dict.fromkeys(info.attrs[key] for info in chunks))
    return values[0] if len(values) == 1 else json.dumps(values)


def _chunk_list(chunks: list[ChunkInfo]) -> str:
    return json.dumps([[info.path.name, info.attrs["digest"]] for info in chunks])


def _merged_attrs(chunks: list[ChunkInfo], report: MergeReport, storage_dtype: str) -> dict:
    first = chunks[0]
    return {
        **first.signature,
        "storage_dtype": storage_dtype,
        "format_version": FORMAT_VERSION,
        "model": first.attrs["model"],
        "model_id": first.attrs["model_id"],
        "device": _distinct(chunks, "device"),
        "library_versions": _distinct(chunks, "library_versions"),
        "max_pixels": _distinct(chunks, "max_pixels"),
        "source": first.attrs["source"],
        "embedded": report.embedded,
        "failed": report.failed,
        "failed_by_reason": json.dumps(report.failed_by_reason),
        "gaps": json.dumps(report.gaps),
        "chunks": _chunk_list(chunks),
    }


def _failed_by_reason(chunks: list[ChunkInfo]) -> dict:
    counter: collections.Counter = collections.Counter()
    for info in chunks:
        counter.update(json.loads(info.attrs["stats"])["failed_by_reason"])
    return dict(counter.most_common())


def _recorded_chunks(path: Path) -> dict[str, str] | None:
    """Name -> digest of the chunks the merged file at `path` was made from; None without a file."""
    if not path.is_file():
        return None
    with open_hdf5(path) as file:
        return dict(json.loads(file.attrs.get("chunks", "[]")))


def _report_of_merged(path: Path) -> MergeReport:
    """What an existing merged file holds, from its attributes."""
    with open_hdf5(path) as file:
        attrs = {key: attribute_value(value) for key, value in file.attrs.items()}
    return MergeReport(
        path,
        embedded=attrs["embedded"],
        failed=attrs["failed"],
        failed_by_reason=json.loads(attrs["failed_by_reason"]),
        chunks=len(json.loads(attrs["chunks"])),
        gaps=[tuple(gap) for gap in json.loads(attrs["gaps"])],
        written=False,
    )


def _holds_every_chunk(path: Path, folder: Path, chunks: list[ChunkInfo]) -> bool:
    """True when the merged file already holds these chunks (it may hold more: CLEANUP removed them).

    A merged file made from chunks that are gone is never replaced by a merge without them: that
    would lose their rows.
    """
    recorded = _recorded_chunks(path)
    if recorded is None:
        return False
    present = {info.path.name: info.attrs["digest"] for info in chunks}
    if present.items() <= recorded.items():
        return True
    gone = sorted(set(recorded) - set(present))
    if gone:
        raise PipelineError(
            f"{path} holds the rows of {len(gone)} chunk file(s) that are no longer in {folder} "
            f"(e.g. {gone[0]}, removed by CLEANUP): merging the chunks there now would lose those rows. "
            f"Set OUTPUT_FILE to a new file, or move {path.name} aside to rebuild it from the chunks present."
        )
    return False


def _write_merged(path: Path, chunks: list[ChunkInfo], attrs: dict) -> None:
    """Stream the chunks into a temporary file in row order, verify it, then rename it into place."""
    digests = []
    with atomic_file(path) as temporary:
        with open_hdf5(temporary, "w") as target:
            _create_merged_datasets(target, attrs["embedded"], attrs["failed"], attrs)
            offset = failed_offset = 0
            for info in progress_bar(chunks, desc="merge", unit="chunk"):
                with open_hdf5(info.path) as source:
                    _check_chunk_records(source, info, int(attrs["embedding_size"]))
                    _copy_records(source, target, ("rows", "image_ids", "urls"), offset)
                    digests.append(_copy_embeddings(source, target, info, offset))
                    failed_names = ("rows", "image_ids", "urls", "reasons")
                    _copy_records(source["failed"], target["failed"], failed_names, failed_offset)
                offset += info.embedded
                failed_offset += info.failed
            target.attrs.update(attrs)
        _verify_merged(temporary, chunks, digests)


def merge_chunks(
    collection: Collection,
    output_file: str | None = None,
    cleanup: bool = False,
    storage_dtype: str = "float32",
) -> MergeReport:
    """Merge every chunk of the collection into OUTPUT_FILE, verified before it replaces anything.

    OUTPUT_FILE None is the collection's Images_Embedded.h5, its vectors stored as `storage_dtype`
    (STORAGE_DTYPE: float32 chunks may be stored as float16). Memory is bounded by one chunk,
    whatever the number of chunks. Overlapping chunks or chunks of different models are errors;
    rows that no chunk covers are reported as gaps. With `cleanup`, the chunk files are deleted
    once the merged file is verified. One merge at a time writes a given OUTPUT_FILE (a lock file
    beside it); a killed merge leaves the old file whole. A collection on object storage is merged
    from its chunks brought into its staged copy, under its lease; the merged file (OUTPUT_FILE
    None) is uploaded whole, and CLEANUP deletes the chunks there too.
    """
    path = resolve_path(output_file) if output_file else collection.merged_file
    check_writable(path.parent)
    with lease(collection, "03_merge"), _merge_lock(path):
        sync_chunks(collection)
        temporary_path(path).unlink(missing_ok=True)  # left by an interrupted merge
        chunks = find_chunks(collection.chunks)
        if not output_file:
            pull(collection, path)
        if _up_to_date(path, collection.chunks, chunks, storage_dtype):
            report = _report_of_merged(path)
        elif chunks:
            report = _merge(path, chunks, storage_dtype)
            if collection.remote and not output_file:
                push(collection, path)
                print(f"Uploaded the merged file to {collection.where(path)}")
        else:
            raise PipelineError(f"There are no chunk files in {collection.name}: run 02_embed first.")
        if cleanup:
            kept = _delete_merged_chunks(path, collection.chunks, chunks)
            delete_chunks(collection, [info.path.name for info in chunks if info.path.name not in kept])
            report = dataclasses.replace(report, kept=kept)
    return report


def _delete_merged_chunks(path: Path, folder: Path, chunks: list[ChunkInfo]) -> list[str]:
    """Delete the chunk files whose records `path` holds, each under its claim; return those kept.

    A chunk that another run is rewriting, or rewrote since the merge read it (RETRY_FAILED), is
    kept: its file holds rows that the merged file does not.
    """
    merged = _recorded_chunks(path) or {}
    kept = []
    for info in chunks:
        with claimed(folder, info.start, info.end, rewrite=True) as claim:
            if not info.path.exists():  # an interrupted cleanup deleted it already
                continue
            digest = read_chunk_info(info.path).attrs["digest"] if isinstance(claim, FileLock) else None
            if digest is not None and digest == merged.get(info.path.name):
                info.path.unlink()
            else:
                kept.append(info.path.name)
    remove_stale_files(folder)  # the claim of a chunk deleted just before a kill
    return kept


def _up_to_date(path: Path, folder: Path, chunks: list[ChunkInfo], storage_dtype: str) -> bool:
    """Whether the merged file at `path` holds these chunks, its vectors stored as `storage_dtype`."""
    if not _holds_every_chunk(path, folder, chunks):
        return False
    with open_hdf5(path) as file:
        stored = str(file["embeddings"].dtype)
    if stored == storage_dtype:
        return True
    if len(_recorded_chunks(path) or {}) > len(chunks):
        raise PipelineError(
            f"{path} stores its vectors as {stored} and holds the rows of chunk files no longer in {folder} "
            f"(removed by CLEANUP): it cannot be made again as {storage_dtype} from the chunks there. Set "
            f"STORAGE_DTYPE={stored!r} to keep it as it is; for {storage_dtype} vectors, embed its rows "
            "again into another OUTPUT_DIR with STORAGE_DTYPE for 02 and 03."
        )
    return False


def _check_storage(chunks: list[ChunkInfo], storage_dtype: str) -> None:
    """float32 chunks may be stored as float16; float16 ones as float32 would claim digits they lack."""
    stored = chunks[0].signature["storage_dtype"]
    if stored == "float16" and storage_dtype == "float32":
        raise PipelineError(
            f"The chunks in {chunks[0].path.parent} hold float16 vectors (02_embed ran with "
            "STORAGE_DTYPE='float16'), and STORAGE_DTYPE='float32' asks for a file of float32 ones: set "
            "STORAGE_DTYPE='float16' here too, or embed again with STORAGE_DTYPE='float32' into another "
            "OUTPUT_DIR."
        )


def _merge(path: Path, chunks: list[ChunkInfo], storage_dtype: str) -> MergeReport:
    """Write the merged file of `chunks` at `path`, its vectors stored as `storage_dtype`."""
    _check_chunks_agree(chunks)
    _check_storage(chunks, storage_dtype)
    check_free_space(path.parent, sum(info.path.stat().st_size for info in chunks), f"merging into {path}")
    report = MergeReport(
        path,
        embedded=sum(info.embedded for info in chunks),
        failed=sum(info.failed for info in chunks),
        failed_by_reason=_failed_by_reason(chunks),
        chunks=len(chunks),
        gaps=find_gaps(chunks, json.loads(chunks[0].attrs["source"])["rows"]),
        written=True,
    )
    _write_merged(path, chunks, _merged_attrs(chunks, report, storage_dtype))
    return report


@contextlib.contextmanager
def _merge_lock(path: Path) -> Iterator[None]:
    """Hold the lock of the merged file `path`, waiting (and saying so) while another merge holds it."""
    lock = FileLock(lock_path(path))
    if not lock.acquire(blocking=False):
        print(f"Waiting for another merge into {path} ({lock_holder(lock.path)}) to finish...")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
