"""01's WebDataset shards: a brace pattern -> its tar shards, each indexed once, -> one row per sample.

A sample is the members of a shard that share a key (`a/b/00042.jpg`, `a/b/00042.txt`: key
`a/b/00042`). Its row holds the key, the byte range of its image inside the shard (which 02 reads
with a range request, `fetch.member_location`), the small text members (`.txt`, `.json`) as
columns, and the url and caption of img2dataset's `.parquet` listing beside the shard. A shard's
index is kept in .cache/shards/ with the shard's version, so a second 01 reads no shard again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ImageFailure, PipelineError
from .fetch import MISSING_REASONS, Fetcher, member_location
from .progress import progress_bar
from .workspace import atomic_file, current_workspace, is_url, resolve_path

SMALL_MEMBER_BYTES = 64 << 10  # a text member up to this size is a column of the table; a larger one is not
IMAGE_PREFERENCE = (
    "jpg",
    "jpeg",
    "png",
    "webp",
)  # a sample's image, of several: the first found in this order
SIDECAR_COLUMNS = ("url", "caption", "md5")  # what img2dataset's listing adds to a sample's row
INDEX_THREADS = 8  # shards indexed at once: remote shards are read end to end, and mostly wait on the network
INDEX_VERSION = 1  # of the files in .cache/shards/
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_MEMBER = re.compile(r"(?P<key>(?:.*/)?[^./][^/]*?)\.(?P<ext>[^/]+)")  # WebDataset's key and extension


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
        width = len(low) if low.startswith("0") else 0
        choices = [f"{number:0{width}d}" for number in range(int(low), int(high) + 1)]
    else:
        choices = inside.split(",")
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def shard_names(source: str) -> list[str]:
    """The shards of SOURCE: a brace pattern, one shard, or a local folder (its .tar files, sorted)."""
    if not is_url(source) and resolve_path(source).is_dir():
        folder = resolve_path(source)
        shards = sorted(str(path) for path in folder.rglob("*.tar") if path.is_file())
        if not shards:
            raise PipelineError(f"SOURCE folder {folder} holds no .tar shards.")
        return shards
    names = expand_braces(source)
    local = [name for name in names if not is_url(name)]
    return [str(resolve_path(name)) for name in local] if len(local) == len(names) else names


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """One shard's samples (key, offset and size of its image, text members) and what was odd in it."""

    samples: pd.DataFrame
    without_image: int = 0  # samples with no image member: not rows
    more_images: int = 0  # samples with several images: their first of IMAGE_PREFERENCE is the row's
    left_out: int = 0  # text members over SMALL_MEMBER_BYTES, or named like a table column: not columns
    truncated: bool = False  # the shard ends inside a member: 02 records that image as failed


def _member_parts(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, as WebDataset splits it; None for a name without both."""
    found = _MEMBER.fullmatch(name)
    return (found["key"], found["ext"].lower()) if found else None


def _is_image(extension: str, image_extensions: set[str]) -> bool:
    return "." + extension.rsplit(".", 1)[-1] in image_extensions


RESERVED_COLUMNS = ("image_id", "location", "url", "rotation", "md5", "caption")  # not taken from members


def _index_archive(shard: str, archive: tarfile.TarFile, image_extensions: set[str]) -> ShardIndex:
    """The samples of an open shard, in the order their first member comes; text members are read."""
    samples: dict[str, dict] = {}
    images: dict[str, dict[str, tuple[int, int]]] = {}
    left_out, truncated = 0, False
    try:
        for member in archive:
            parts = _member_parts(member.name) if member.isfile() else None
            if parts is None:
                continue
            key, extension = parts
            sample = samples.setdefault(key, {"image_id": key})
            if _is_image(extension, image_extensions):
                images.setdefault(key, {})[extension] = (member.offset_data, member.size)
            elif member.size > SMALL_MEMBER_BYTES or extension in RESERVED_COLUMNS:
                left_out += 1
            else:
                sample[extension] = archive.extractfile(member).read().decode("utf-8", errors="replace")
    except tarfile.ReadError as error:
        if "unexpected end of data" not in str(error):
            raise
        truncated = True
    rows, more = [], 0
    for key, sample in samples.items():
        found = images.get(key)
        if found:
            more += len(found) > 1
            chosen = next((ext for ext in IMAGE_PREFERENCE if ext in found), next(iter(found)))
            rows.append({**sample, "location": member_location(shard, *found[chosen])})
    frame = pd.DataFrame(rows, columns=None if rows else ["image_id", "location"]).fillna("")
    return ShardIndex(frame, len(samples) - len(images), more, left_out, truncated)


_INDEX_KEY = b"clip_image_embeddings.shard"  # the shard's version and counts, in the cached file's metadata


def _cached_index(shard: str) -> Path:
    digest = hashlib.sha256(f"{INDEX_VERSION}\n{shard}".encode()).hexdigest()[:32]
    return current_workspace().cache / "shards" / f"{digest}.parquet"


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


def index_shard(fetcher: Fetcher, shard: str, image_extensions: set[str]) -> ShardIndex | None:
    """The shard's samples, from .cache/shards/ when the shard is unchanged; None: there is no such shard.

    A local shard is read header by header; a remote one is read once, end to end.
    """
    cached = _cached_index(shard)
    try:
        with fetcher.stream(shard) as (body, version):
            version = {key: str(value) for key, value in version.items() if value is not None}
            found = _load_cached(cached, version) if _versioned(version) else None
            if found is not None:
                return found
            mode = "r:" if body.seekable() and not is_url(shard) else "r|"
            with tarfile.open(fileobj=body, mode=mode) as archive:
                index = _index_archive(shard, archive, image_extensions)
    except ImageFailure as failure:
        if failure.reason in MISSING_REASONS:
            return None
        raise PipelineError(
            f"Cannot read the shard {shard} ({failure.reason}): check the network, S3_ENDPOINT_URL and the "
            "credentials, then run 01_metadata again (the shards read so far are not read again)."
        ) from None
    except tarfile.ReadError as error:
        raise PipelineError(f"The shard {shard} is not a tar file ({error}): check SOURCE.") from None
    if _versioned(version) and not index.truncated:
        _save_cached(cached, version, index)
    return index


def _sidecar(fetcher: Fetcher, shard: str) -> pd.DataFrame | None:
    """img2dataset's listing beside a shard (00042.parquet for 00042.tar): url and caption by key."""
    if not shard.endswith(".tar"):
        return None
    location = shard.removesuffix(".tar") + ".parquet"
    try:
        listing = pd.read_parquet(io.BytesIO(fetcher.fetch(location)))
    except ImageFailure as failure:
        if failure.reason in MISSING_REASONS:
            return None
        raise PipelineError(
            f"Cannot read {location} ({failure.reason}): check the network, then run again."
        ) from None
    except (ValueError, OSError, pa.ArrowException) as error:
        raise PipelineError(
            f"{location} is not a Parquet listing ({error}): move it aside, or fix it."
        ) from None
    if "key" not in listing.columns:
        raise PipelineError(
            f"{location} lacks the 'key' column that img2dataset writes (its columns are "
            f"{list(listing.columns)}): move it aside to index {shard} without it."
        )
    columns = [column for column in SIDECAR_COLUMNS if column in listing.columns]
    listing = listing.astype({"key": str}).drop_duplicates("key").set_index("key")[columns]
    return listing.fillna("").astype(str)


def _rows_of_shard(fetcher: Fetcher, shard: str, image_extensions: set[str]) -> tuple[str, ShardIndex | None]:
    index = index_shard(fetcher, shard, image_extensions)
    if index is None:
        return shard, None
    listing = _sidecar(fetcher, shard)
    if listing is None:
        return shard, index
    keys = index.samples["image_id"]
    joined = listing.reindex(keys).fillna("").reset_index(drop=True)
    samples = index.samples.drop(columns=[c for c in joined.columns if c in index.samples.columns])
    return shard, dataclasses.replace(index, samples=pd.concat([samples, joined], axis=1))


def webdataset_samples(source: str, fetcher: Fetcher, image_extensions: set[str]) -> pd.DataFrame:
    """One row per sample with an image, over every shard of SOURCE in order: image_id (the key),
    location (its image's byte range), url, caption and md5 from img2dataset's listing ('' where
    there is none), and one column per small text member (txt, json, ...).

    A missing shard is left out and named; a shard that ends inside a member keeps that member,
    which 02 records as failed ("truncated member").
    """
    shards = shard_names(source)
    indexes: dict[str, ShardIndex | None] = {}
    with concurrent.futures.ThreadPoolExecutor(INDEX_THREADS) as pool:
        pending = [pool.submit(_rows_of_shard, fetcher, shard, image_extensions) for shard in shards]
        for done in progress_bar(
            concurrent.futures.as_completed(pending), total=len(pending), desc="index", unit="shard"
        ):
            shard, index = done.result()
            indexes[shard] = index
    found = [indexes[shard] for shard in shards if indexes[shard] is not None]
    _report(source, shards, indexes)
    if not found:
        raise PipelineError(f"None of the {len(shards)} shard(s) of SOURCE={source!r} exists: check SOURCE.")
    frame = pd.concat([index.samples for index in found], ignore_index=True).fillna("")
    for column in SIDECAR_COLUMNS:
        if column not in frame.columns:
            frame[column] = ""
    return frame


def _report(source: str, shards: list[str], indexes: dict[str, ShardIndex | None]) -> None:
    """Print what the table leaves out of the shards, and why."""
    missing = [shard for shard in shards if indexes[shard] is None]
    found = [index for index in indexes.values() if index is not None]
    notes = {
        "sample(s) without an image member, left out": sum(index.without_image for index in found),
        f"sample(s) with several images, of which the row takes the first of {IMAGE_PREFERENCE}": sum(
            index.more_images for index in found
        ),
        f"text member(s) over {SMALL_MEMBER_BYTES >> 10} KiB or named like a table column, not columns": sum(
            index.left_out for index in found
        ),
    }
    print(f"{len(found)} of {len(shards)} shard(s) of {source} indexed")
    for note, count in notes.items():
        if count:
            print(f"  {count:,} {note}")
    if missing:
        print(
            f"WARNING: {len(missing)} shard(s) do not exist, so their images are not in the table: "
            f"{_some(missing)}. Fetch them, then run 01_metadata again to add their images."
        )
    truncated = [shard for shard in shards if indexes[shard] is not None and indexes[shard].truncated]
    if truncated:
        print(
            f"WARNING: {len(truncated)} shard(s) end inside a member: {_some(truncated)}. An image cut "
            "there is in the table, and 02 records it as failed ('truncated member'). Fetch the shard again "
            "whole, then run 01_metadata again."
        )


def _some(names: list[str], shown: int = 3) -> str:
    """A few names of a list, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
