"""01's WebDataset shards: a brace pattern -> its tar shards, each indexed once, -> one row per sample.

A sample is the members of a shard that share a key (`a/b/00042.jpg`, `a/b/00042.txt`: key
`a/b/00042`). Its row holds the key, the byte range of its image inside the shard (which 02 reads
with a range request, `fetch.member_location`), its small text members (`.txt`, `.json`) as
columns, and the url and caption of img2dataset's `.parquet` listing beside the shard. A shard's
index is kept in .cache/shards/ with the shard's version, so a second 01 reads no shard again.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import IO

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ImageFailure, PipelineError, counted
from .fetch import MISSING_REASONS, Fetcher, member_location
from .progress import progress_bar
from .workspace import atomic_file, current_workspace, is_url, resolve_path, visible_files

SMALL_MEMBER_BYTES = 1 << 10  # a UTF-8 member up to this size is a column (9M rows of 1 KiB: 9 GB in 01)
IMAGE_PREFERENCE = ("jpg", "jpeg", "png", "webp")  # a sample's image, of several: the first in this order
RESERVED_COLUMNS = ("image_id", "location", "url", "rotation", "md5", "caption")  # never a member's column
SIDECAR_COLUMNS = ("url", "caption")  # what img2dataset's listing adds to a sample's row
INDEX_THREADS = 8  # shards indexed at once: remote shards are read end to end, and mostly wait on the network
INDEX_VERSION = 1  # of the files in .cache/shards/
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_MEMBER = re.compile(r"(?P<key>(?:.*/)?[^./][^/]*?)\.(?P<ext>[^/]+)")  # WebDataset's key and extension
_BLOCK = 512  # a tar block: headers, and the two zero blocks that end an archive


def expand_braces(pattern: str) -> list[str]:
    """The names a brace pattern stands for: `{000..012}` a zero-padded range, `{a,b}` alternatives."""
    found = _BRACES.search(pattern)
    if found is None:
        return [pattern]
    inside, head, tail = found[1], pattern[: found.start()], pattern[found.end() :]
    numbers = _RANGE.fullmatch(inside)
    if numbers:
        low, high = numbers[1], numbers[2]
        if int(low) > int(high):
            raise PipelineError(
                f"SOURCE={pattern!r}: the range {{{inside}}} runs backwards; write {{{high}..{low}}}."
            )
        width = max(len(low), len(high)) if low.startswith("0") else 0
        choices = [f"{number:0{width}d}" for number in range(int(low), int(high) + 1)]
    else:
        choices = inside.split(",")
    names = [name for choice in choices for name in expand_braces(head + choice + tail)]
    return list(dict.fromkeys(names))  # {a,{a,b}} names a once


def shard_names(source: str) -> list[str]:
    """The shards of SOURCE: a brace pattern, one shard, or a local folder (its .tar files, sorted)."""
    if not is_url(source) and resolve_path(source).is_dir():
        folder = resolve_path(source)
        names = [str(folder / name) for name in visible_files(folder, {".tar"})]
        if not names:
            raise PipelineError(f"SOURCE folder {folder} holds no .tar shards.")
        return names
    names = expand_braces(source)
    compressed = [name for name in names if name.endswith(COMPRESSED)]
    if compressed:
        raise PipelineError(
            f"SOURCE names compressed shards ({compressed[0]}): their images cannot be read by byte range. "
            "Decompress them into .tar files (gunzip keeps the same names without .gz) and give those."
        )
    local = [name for name in names if not is_url(name)]
    return [str(resolve_path(name)) for name in local] if len(local) == len(names) else names


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """One shard's samples (key, its image's location, text members) and what was odd in it."""

    samples: pd.DataFrame
    without_image: int = 0  # samples with no image member: not rows
    more_images: int = 0  # samples with several images: their first of IMAGE_PREFERENCE is the row's
    left_out: int = 0  # members neither image nor UTF-8 text of up to SMALL_MEMBER_BYTES: not columns
    cut: bool = False  # the shard ends inside a member or a header


def _member_parts(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, as WebDataset splits it; None for a name without both."""
    found = _MEMBER.fullmatch(name)
    return (found["key"], found["ext"].lower()) if found else None


def _is_image(extension: str, image_extensions: set[str]) -> bool:
    return "." + extension.rsplit(".", 1)[-1] in image_extensions


def _text(archive: tarfile.TarFile, member: tarfile.TarInfo, extension: str) -> str | None:
    """A member's content as a column's value, if it is UTF-8 of up to SMALL_MEMBER_BYTES."""
    if member.size > SMALL_MEMBER_BYTES or extension in RESERVED_COLUMNS:
        return None
    try:
        return archive.extractfile(member).read().decode("utf-8")
    except UnicodeDecodeError:
        return None


class _RecentBytes:
    """A stream that remembers the reads it gave last, to see how a tar read as a stream ended."""

    KEEP = 4  # reads of a record (10 KiB) each: the block where tarfile stopped is in the last ones

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self.position = 0
        self._recent: collections.deque[bytes] = collections.deque(maxlen=self.KEEP)

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.position += len(data)
        self._recent.append(data)
        return data

    def block_at(self, offset: int) -> bytes:
        recent = b"".join(self._recent)
        start = offset - (self.position - len(recent))
        return recent[start : start + _BLOCK] if start >= 0 else b"\0" * _BLOCK


def _block_at(body: IO[bytes], offset: int) -> bytes:
    """The tar block at `offset` of a seekable shard."""
    body.seek(offset)
    return body.read(_BLOCK)


def _index_archive(shard: str, archive: tarfile.TarFile, image_extensions: set[str]) -> ShardIndex:
    """The samples of an open shard, in the order their first member comes; text members are read."""
    samples: dict[str, dict] = {}
    images: dict[str, dict[str, tuple[int, int]]] = {}
    left_out, cut = 0, False
    try:
        for member in archive:
            parts = _member_parts(member.name) if member.isfile() else None
            if parts is None:
                continue
            key, extension = parts
            sample = samples.setdefault(key, {"image_id": key})
            if _is_image(extension, image_extensions):
                images.setdefault(key, {})[extension] = (member.offset_data, member.size)
            elif (text := _text(archive, member, extension)) is not None:
                sample[extension] = text
            else:
                left_out += 1
    except tarfile.ReadError:  # past the first member: the shard ends, or is damaged, part-way
        cut = True
    rows, more = [], 0
    for key, sample in samples.items():
        found = images.get(key)
        if found:
            more += len(found) > 1
            chosen = next((ext for ext in IMAGE_PREFERENCE if ext in found), next(iter(found)))
            rows.append({**sample, "location": member_location(shard, *found[chosen])})
    frame = pd.DataFrame(rows, columns=None if rows else ["image_id", "location"]).fillna("")
    return ShardIndex(frame, len(samples) - len(images), more, left_out, cut)


def _ended_whole(index: ShardIndex, end: bytes) -> ShardIndex:
    """The index, marked as cut where the archive stops at a partial or damaged header.

    tarfile ends its iteration there without an error; a whole archive ends with a zero block, or
    (some writers) at the end of its last member.
    """
    if index.cut or not end or end == b"\0" * _BLOCK:
        return index
    return dataclasses.replace(index, cut=True)


def _cached_index(shard: str, image_extensions: set[str]) -> Path:
    """Where the shard's index is kept: by its name, and the image types this Pillow opens."""
    key = f"{INDEX_VERSION}\n{shard}\n{' '.join(sorted(image_extensions))}"
    return current_workspace().cache / "shards" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.parquet"


_INDEX_KEY = b"clip_image_embeddings.shard"  # the shard's version and counts, in the cached file's metadata


def _load_cached(path: Path, version: dict) -> ShardIndex | None:
    """The cached index at `path` if it was made from this version of its shard."""
    try:
        table = pq.read_table(path)
        record = json.loads((table.schema.metadata or {})[_INDEX_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):  # none, or not a whole file
        return None
    if record["version"] != version:
        return None
    return ShardIndex(table.replace_schema_metadata(None).to_pandas(), **record["counts"])


def _save_cached(path: Path, version: dict, index: ShardIndex) -> None:
    """The index and the shard's version in one file, written whole."""
    counts = {field.name: getattr(index, field.name) for field in dataclasses.fields(index)[1:]}
    table = pa.Table.from_pandas(index.samples, preserve_index=False)
    record = json.dumps({"version": version, "counts": counts}).encode()
    with atomic_file(path) as temporary:
        pq.write_table(table.replace_schema_metadata({_INDEX_KEY: record}), temporary)


def _versioned(version: dict) -> bool:
    """Whether a version tells a changed shard from this one (it has more than a size)."""
    return any(value for key, value in version.items() if key != "size")


class BadShard(Exception):
    """A shard that is there but is no tar archive (empty, or something else): left out, with why."""


def index_shard(fetcher: Fetcher, shard: str, image_extensions: set[str]) -> ShardIndex | None:
    """The shard's samples, from .cache/shards/ when the shard is unchanged; None: there is no such shard.

    A local shard is read header by header; a remote one is read once, end to end. A shard that is
    no tar archive raises BadShard; one that cannot be read, a PipelineError that says why.
    """
    cached = _cached_index(shard, image_extensions)
    try:
        with fetcher.stream(shard) as (body, version):
            version = {key: str(value) for key, value in version.items() if value is not None}
            found = _load_cached(cached, version) if _versioned(version) else None
            if found is not None:
                return found
            seekable = body.seekable() and not is_url(shard)
            source = body if seekable else _RecentBytes(body)
            with tarfile.open(fileobj=source, mode="r:" if seekable else "r|") as archive:
                index = _index_archive(shard, archive, image_extensions)
                end = _block_at(body, archive.offset) if seekable else source.block_at(archive.offset)
    except ImageFailure as failure:
        if failure.reason in MISSING_REASONS:
            return None
        raise PipelineError(_unreadable(fetcher, shard, failure.reason)) from None
    except tarfile.ReadError as error:
        raise BadShard(str(error)) from None
    except OSError as error:  # a store's read failing part-way
        raise PipelineError(_unreadable(fetcher, shard, f"{type(error).__name__}: {error}")) from None
    index = _ended_whole(index, end)
    if _versioned(version) and not index.cut:
        _save_cached(cached, version, index)
    return index


def _unreadable(fetcher: Fetcher, shard: str, reason: str) -> str:
    """Why a shard cannot be read, and what to do."""
    if reason == "s3 AccessDenied":
        bucket = shard.split("/")[2]
        return (
            f"Cannot read the shard {shard} (s3 AccessDenied): the bucket refuses this machine, which asked "
            f"{fetcher.s3_access(bucket)}, or it has no such shard (a bucket that does not let this machine "
            "list it answers so for a missing key). Check SOURCE and the credentials, then run 01 again."
        )
    return (
        f"Cannot read the shard {shard} ({reason}): check the network, S3_ENDPOINT_URL and the credentials, "
        "then run 01_metadata again (the shards read so far are not read again)."
    )


def _sidecar(fetcher: Fetcher, shard: str) -> tuple[pd.DataFrame | None, str | None]:
    """img2dataset's listing beside a shard (00042.parquet for 00042.tar), url and caption by key;
    and why a listing that is there could not be used (None: it was, or there is none)."""
    if not shard.endswith(".tar"):
        return None, None
    location = shard.removesuffix(".tar") + ".parquet"
    try:
        listing = pd.read_parquet(io.BytesIO(fetcher.fetch(location)))
    except ImageFailure as failure:
        return None, None if failure.reason in MISSING_REASONS else failure.reason
    except (ValueError, OSError, pa.ArrowException):
        return None, "not a Parquet file"
    if "key" not in listing.columns:
        return None, "no 'key' column"
    columns = [column for column in SIDECAR_COLUMNS if column in listing.columns]
    listing = listing.astype({"key": str}).drop_duplicates("key").set_index("key")[columns]
    return listing.fillna("").astype(str), None


@dataclasses.dataclass(frozen=True)
class _Shard:
    """What 01 made of one shard: its index (None: not there), why it is bad or its listing unused."""

    name: str
    index: ShardIndex | None = None
    bad: str | None = None
    listing_problem: str | None = None
    unmatched: bool = False  # a listing whose keys match fewer than half the shard's samples


def _read_shard(fetcher: Fetcher, shard: str, image_extensions: set[str]) -> _Shard:
    try:
        index = index_shard(fetcher, shard, image_extensions)
    except BadShard as error:
        return _Shard(shard, bad=str(error))
    if index is None:
        return _Shard(shard)
    listing, problem = _sidecar(fetcher, shard)
    if listing is None:
        return _Shard(shard, index, listing_problem=problem)
    keys = index.samples["image_id"]
    joined = listing.reindex(keys).fillna("").reset_index(drop=True)
    samples = pd.concat([index.samples, joined], axis=1)
    unmatched = keys.isin(listing.index).sum() < len(keys) / 2
    return _Shard(shard, dataclasses.replace(index, samples=samples), unmatched=unmatched)


def _read_shards(fetcher: Fetcher, shards: list[str], image_extensions: set[str]) -> list[_Shard]:
    """Every shard read, INDEX_THREADS at once, in the order of `shards`; the first error stops the rest."""
    pool = concurrent.futures.ThreadPoolExecutor(INDEX_THREADS)
    try:
        pending = [pool.submit(_read_shard, fetcher, shard, image_extensions) for shard in shards]
        done = concurrent.futures.as_completed(pending)
        for future in progress_bar(done, total=len(pending), desc="index", unit="shard"):
            future.result()
        return [future.result() for future in pending]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # an error, or Ctrl-C, is told at once


def webdataset_samples(source: str, fetcher: Fetcher, image_extensions: set[str]) -> pd.DataFrame:
    """One row per sample with an image, over every shard of SOURCE in order: image_id (the key),
    location (its image's byte range), url and caption from img2dataset's listing ('' where there is
    none), and one column per small text member (txt, json, ...).

    A shard that is missing, or no tar archive, is left out and named; a shard that ends inside a
    member keeps that member, which 02 records as failed ("truncated member").
    """
    shards = _read_shards(fetcher, shard_names(source), image_extensions)
    _report(source, shards)
    found = [shard for shard in shards if shard.index is not None]
    if not found:
        raise PipelineError(
            f"None of the {len(shards)} shard(s) of SOURCE={source!r} could be indexed (the warnings above "
            "say why): check SOURCE."
        )
    frame = pd.concat([shard.index.samples for shard in found], ignore_index=True).fillna("")
    for column in SIDECAR_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    _check_unique_keys(frame)
    return frame


def _check_unique_keys(frame: pd.DataFrame) -> None:
    """A key in two shards would be one image_id for two images."""
    repeated = frame[frame["image_id"].duplicated(keep=False)]
    if repeated.empty:
        return
    key = repeated["image_id"].iloc[0]
    where = [location.split("#bytes=")[0] for location in repeated["location"][repeated["image_id"] == key]]
    raise PipelineError(
        f"{repeated['image_id'].nunique():,} sample key(s) are in more than one shard, e.g. {key!r} in "
        f"{' and '.join(where[:2])}: image_id is the key, and must name one image. Give shards whose keys "
        "differ (img2dataset numbers them across all shards), or index such shards in collections of their "
        "own."
    )


def _report(source: str, shards: list[_Shard]) -> None:
    """Print what the table leaves out of the shards, and why."""
    found = [shard.index for shard in shards if shard.index is not None]
    notes = {
        "sample(s) without an image member, left out": sum(index.without_image for index in found),
        f"sample(s) with several images, of which the row takes the first of {IMAGE_PREFERENCE}": sum(
            index.more_images for index in found
        ),
        f"member(s) neither images nor UTF-8 texts of {SMALL_MEMBER_BYTES >> 10} KiB or less, not columns": (
            sum(index.left_out for index in found)
        ),
        "listing(s) beside the shards whose keys match fewer than half their samples (check them)": sum(
            shard.unmatched for shard in shards
        ),
    }
    print(f"{len(found)} of {len(shards)} shard(s) of {source} indexed")
    for note, count in notes.items():
        if count:
            print(f"  {count:,} {note}")
    problems = collections.Counter(shard.listing_problem for shard in shards if shard.listing_problem)
    if problems:
        print(
            f"  {problems.total():,} listing(s) beside the shards could not be read ({counted(problems)}): "
            "their samples have no url and caption from img2dataset"
        )
    _warn(shards)


_BEFORE_02 = (
    "then run 01_metadata again before 02_embed starts on this collection (a table of other rows is another "
    "table, whose chunks 02 makes afresh: after 02 has run, give it another OUTPUT_DIR)"
)


def _warn(shards: list[_Shard]) -> None:
    """Warn of the shards left out, and of those cut short."""
    missing = [shard.name for shard in shards if shard.index is None and shard.bad is None]
    bad = [f"{shard.name} ({shard.bad})" for shard in shards if shard.bad]
    cut = [shard.name for shard in shards if shard.index is not None and shard.index.cut]
    if missing:
        print(
            f"WARNING: {len(missing)} shard(s) do not exist, and their images are not in the table: "
            f"{_some(missing)}. Fetch them, {_BEFORE_02}."
        )
    if bad:
        print(
            f"WARNING: {len(bad)} shard(s) are no tar archives, and are left out: {_some(bad)}. Fetch them "
            f"again, {_BEFORE_02}."
        )
    if cut:
        print(
            f"WARNING: {len(cut)} shard(s) end part-way, inside a member or a header: {_some(cut)}. An image "
            "cut there is in the table and 02 records it as failed ('truncated member'): with the shard "
            "fetched again whole, RETRY_FAILED=True embeds it. Samples after the cut are not in the table: "
            f"for them, fetch the shards again whole, {_BEFORE_02}."
        )


def _some(names: list[str], shown: int = 3) -> str:
    """A few names of a list, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
