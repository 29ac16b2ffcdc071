"""Where files go: the repository root, its shared .cache/, and one collection per OUTPUT_DIR.

Every stage resolves its paths here and writes through `atomic_file`, so a file with its final name
is always whole; disk space and write permission are checked before work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from .errors import PipelineError
from .settings import current_settings

DEFAULT_OUTPUT_DIR = "OUTPUT"
MERGED_FILE_NAME = "Images_Embedded.h5"  # the original notebook's name for the merged file


@dataclasses.dataclass(frozen=True)
class Workspace:
    """The repository root, and what collections share under .cache/ (downloads, thumbnails, models)."""

    root: Path

    @property
    def cache(self) -> Path:
        return self.root / ".cache"

    @property
    def downloads(self) -> Path:
        return self.cache / "downloads"

    @property
    def thumbnails(self) -> Path:
        return self.cache / "thumbnails"

    @property
    def models(self) -> Path:
        """Checkpoints converted into transformers' format (OpenAI .pt files)."""
        return self.cache / "models"

    @property
    def earlier_table(self) -> Path:
        """Where versions without OUTPUT_DIR kept the checkout's one image table (OUTPUT/'s)."""
        return self.cache / "image_table.parquet"


@dataclasses.dataclass(frozen=True)
class Collection:
    """One OUTPUT_DIR: all that is made from one dataset (image table, chunks, merged file, runs).

    An OUTPUT_DIR on object storage (`remote`) is staged in `folder`, under .cache/collections/.
    """

    folder: Path
    remote: str | None = None  # the object-storage URL
    endpoint_url: str | None = None  # its S3_ENDPOINT_URL

    @property
    def name(self) -> str:
        """OUTPUT_DIR as the user gave it: the URL, or the folder."""
        return self.remote or str(self.folder)

    def where(self, path: Path) -> str:
        """A file of the collection as the user knows it: its path, or its URL on object storage."""
        return f"{self.remote}/{path.relative_to(self.folder).as_posix()}" if self.remote else str(path)

    @property
    def table(self) -> Path:
        return self.folder / "image_table.parquet"

    @property
    def chunks(self) -> Path:
        return self.folder / "chunks"

    @property
    def merged_file(self) -> Path:
        """Where 03 writes and 04 reads when OUTPUT_FILE and EMBEDDINGS are None."""
        return self.folder / MERGED_FILE_NAME


def current_workspace() -> Workspace:
    """The workspace of the configured repository root (`configure(root=...)`)."""
    return Workspace(current_settings().root)


def resolve_path(path: str | os.PathLike) -> Path:
    """A user's path: '~' expanded, relative paths taken from the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else current_workspace().root / path


def collection(
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR, s3_endpoint_url: str | None = None
) -> Collection:
    """The collection in OUTPUT_DIR: a folder (relative paths start at the repository root) or a URL.

    A URL (s3://bucket/prefix) is staged in .cache/collections/ and reached through S3_ENDPOINT_URL.
    """
    if not is_url(output_dir):
        return Collection(resolve_path(output_dir))
    url = str(output_dir).rstrip("/")
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[1])[-60:]
    staging = (
        current_workspace().cache / "collections" / f"{label}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    )
    return Collection(staging, url, s3_endpoint_url)


def is_url(output_dir: str | os.PathLike) -> bool:
    """Whether OUTPUT_DIR is a URL (s3://...) rather than a folder."""
    return len(urlparse(str(output_dir)).scheme) > 1


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_and_replace(temporary: Path, final: Path) -> None:
    """Make `final` appear whole or not at all: flush to disk, rename, flush the directory."""
    with open(temporary, "rb") as file:
        os.fsync(file.fileno())
    os.replace(temporary, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place."""
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it whole on success and is removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        fsync_and_replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path` that replaces it whole on success and is removed on failure."""
    temporary, earlier = temporary_path(path), path.with_name(path.name + ".old")
    for leftover in (temporary, earlier):
        shutil.rmtree(leftover, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        if path.exists():
            path.rename(earlier)
        temporary.rename(path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(earlier, ignore_errors=True)


def visible_files(folder: Path, suffixes: set[str]) -> list[str]:
    """Files under `folder` ending in `suffixes` (lowercase), recursively, none hidden: relative, sorted."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.suffix.lower() in suffixes
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def write_json(path: Path, record: dict) -> None:
    """Write a JSON record whole or not at all."""
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(record, indent=1))


def read_json(path: Path) -> dict:
    """A JSON record, or {} when the file is missing or not a whole record."""
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and make sure this process can write files in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PipelineError(
            f"Cannot write in {folder} ({error.strerror or error}): give this user write permission "
            "there, or run from a copy of the repository that it owns."
        ) from None


def check_free_space(folder: Path, needed: int, purpose: str) -> None:
    """An error, before any work, when the disk of `folder` has less than `needed` bytes free."""
    free = current_settings().disk_usage(folder).free
    if free < needed:
        raise PipelineError(
            f"Not enough disk space for {purpose}: it needs about {needed / 2**30:,.2f} GiB in {folder}, "
            f"and {free / 2**30:,.2f} GiB is free. Free some space, or make OUTPUT/ a link to a larger disk."
        )
