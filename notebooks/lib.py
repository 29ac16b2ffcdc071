"""All logic of the CLIP image-embedding pipeline; the stage notebooks call it and show the results.

    01_metadata   build_image_table -> save_image_table      OUTPUT_DIR/image_table.parquet
    02_embed      load_image_table, run_encoder,
                  plan_chunks -> embed_chunks                 OUTPUT_DIR/chunks/chunk_<start>_<end>.h5
    03_merge      merge_chunks                                OUTPUT_DIR/Images_Embedded.h5
    04_search     open_embeddings, query_encoder, search      top-k tables, galleries, exports

Each stage works in a collection (`collection(OUTPUT_DIR)`). Sections follow the data: errors,
progress, parameters, paths and downloads, sources (metadata -> image table), fetch (bytes from
S3, HTTP or disk), decode and preprocess, encode, chunk files, locks, embed, merge, search,
environment. Each seam is a plain function or a small class that a test can drive alone.
"""

from __future__ import annotations

import ast
import base64
import collections
import contextlib
import ctypes
import dataclasses
import difflib
import errno
import fcntl
import functools
import hashlib
import html
import io
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import h5py
import numpy as np
import pandas as pd
import PIL
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import torch
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

FORMAT_VERSION = 2  # 2: orientation options and the pixel limit in every file


DEFAULT_OUTPUT_DIR = "OUTPUT"
MERGED_FILE_NAME = "Images_Embedded.h5"  # the original notebook's name for the merged file


@dataclasses.dataclass(frozen=True)
class Workspace:
    """The repository root, and what every collection shares under .cache/ (downloads, thumbnails)."""

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
    def earlier_table(self) -> Path:
        """Where versions without OUTPUT_DIR kept the checkout's one image table (OUTPUT/'s)."""
        return self.cache / "image_table.parquet"


@dataclasses.dataclass(frozen=True)
class Collection:
    """One OUTPUT_DIR: all that is made from one dataset (image table, chunks, merged file, runs)."""

    folder: Path

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


WORKSPACE = Workspace(Path(__file__).resolve().parent.parent)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class PipelineError(Exception):
    """A problem the user can fix (bad parameter, missing input, unreachable server)."""

    def _render_traceback_(self) -> list[str]:
        """Show only the message in a notebook: the message says what to do, a traceback does not."""
        return [f"{type(self).__name__}: {self}"]


class ParameterError(PipelineError):
    """A notebook parameter with a name or value that no stage accepts."""


class ImageFailure(Exception):
    """One image could not be embedded; `reason` is short and stable, e.g. 'http 404'."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Progress: tqdm bars where someone watches them, printed lines where nobody can
# ---------------------------------------------------------------------------------------------


def watched() -> bool:
    """True where someone watches progress bars: a notebook front end, or a terminal.

    The front ends that render tqdm's widgets (JupyterLab, Notebook, VS Code, Colab) can answer
    input(); papermill, nbval and nbconvert cannot, and tell the kernel so with every cell.
    """
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    kernel = getattr(shell, "kernel", None)
    if kernel is not None:
        return bool(getattr(kernel, "_allow_stdin", False))
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable | None = None, **options: Any) -> tqdm:
    """A tqdm bar where someone watches (see `watched`), a silent one elsewhere."""
    return tqdm(iterable, disable=not watched(), **options)


# ---------------------------------------------------------------------------------------------
# Parameters: one dataclass per stage, built from the notebook's namespace and validated
# ---------------------------------------------------------------------------------------------

DATASETS = ("openimages-v7", "table", "folder")
SPLITS = ("train", "validation", "test")
FETCH_MODES = ("s3", "url")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
PREPROCESS_MODES = ("exact", "fast")
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
_PARAMETER_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParameterError(f"{name}={value!r} is not allowed: use an integer >= {minimum}.")


def _check_size(name: str, value: Any) -> None:
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ParameterError(f"{name}={value!r} is not allowed: use an integer >= 1, or 'auto'.")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(choice) for choice in choices)
        raise ParameterError(f"{name}={value!r} is not allowed: use one of {allowed}.")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ParameterError(f"{name}={value!r} is not allowed: use True or False.")


def _check_text(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        allowed = "a non-empty string or None" if optional else "a non-empty string"
        raise ParameterError(f"{name}={value!r} is not allowed: use {allowed}.")


def _check_device(name: str, value: Any) -> None:
    if not isinstance(value, str) or not _DEVICE_PATTERN.fullmatch(value):
        raise ParameterError(f"{name}={value!r} is not allowed: use 'auto', 'cpu', 'cuda' or 'cuda:N'.")


def _check_output_dir(value: Any) -> None:
    _check_text("OUTPUT_DIR", value)
    if urlparse(value).scheme:
        raise ParameterError(
            f"OUTPUT_DIR={value!r} is not allowed: use a folder on this machine or on a mounted disk, "
            f"such as {DEFAULT_OUTPUT_DIR!r} or '/mnt/shared/openimages' (one folder per collection)."
        )


def _check_s3_endpoint_url(value: Any) -> None:
    _check_text("S3_ENDPOINT_URL", value, optional=True)
    if value and urlparse(value).scheme not in ("http", "https"):
        raise ParameterError(
            f"S3_ENDPOINT_URL={value!r} is not allowed: use an http(s) URL such as "
            "'http://127.0.0.1:9000', or None for the default endpoint."
        )


@dataclasses.dataclass(frozen=True)
class SetupParams:
    """Parameters of 00_setup."""

    device: str
    output_dir: str = DEFAULT_OUTPUT_DIR

    def __post_init__(self) -> None:
        _check_device("DEVICE", self.device)
        _check_output_dir(self.output_dir)


@dataclasses.dataclass(frozen=True)
class MetadataParams:
    """Parameters of 01_metadata."""

    dataset: str
    split: str
    source: str | dict | None
    fetch: str
    output_dir: str = DEFAULT_OUTPUT_DIR

    def __post_init__(self) -> None:
        _check_choice("DATASET", self.dataset, DATASETS)
        _check_choice("SPLIT", self.split, SPLITS)
        _check_choice("FETCH", self.fetch, FETCH_MODES)
        _check_output_dir(self.output_dir)
        if self.dataset == "table" and isinstance(self.source, dict):
            _check_column_sources(self.source)
        else:
            _check_text("SOURCE", self.source, optional=self.dataset == "openimages-v7")


def _check_column_sources(source: dict) -> None:
    missing = [column for column in ("image_id", "url") if column not in source]
    if missing or not all(isinstance(value, str) and value for value in source.values()):
        raise ParameterError(
            f"SOURCE={source!r} is not allowed: a mapping must give, for each column, the path or "
            "URL of a JSON list, and must include 'image_id' and 'url' "
            "(e.g. {'image_id': 'image_ids.json', 'url': 'image_urls.json'})."
        )


@dataclasses.dataclass(frozen=True)
class EmbedParams:
    """Parameters of 02_embed."""

    start: int
    end: int | None
    chunk: int
    gpu_batch_size: int | str
    num_workers: int | str
    model: str
    model_revision: str | None
    device: str
    precision: str
    preprocess: str
    exif_transpose: bool
    apply_rotation: bool
    max_pixels: int
    s3_endpoint_url: str | None
    retry_failed: bool
    output_dir: str = DEFAULT_OUTPUT_DIR
    stop_if_unreachable: bool = True

    def __post_init__(self) -> None:
        _check_output_dir(self.output_dir)
        _check_int("START", self.start, 0)
        if self.end is not None:
            _check_int("END", self.end, self.start + 1)
        _check_int("CHUNK", self.chunk, 1)
        _check_size("GPU_BATCH_SIZE", self.gpu_batch_size)
        _check_size("NUM_WORKERS", self.num_workers)
        _check_text("MODEL", self.model)
        _check_text("MODEL_REVISION", self.model_revision, optional=True)
        _check_device("DEVICE", self.device)
        _check_choice("PRECISION", self.precision, PRECISIONS)
        _check_choice("PREPROCESS", self.preprocess, PREPROCESS_MODES)
        _check_bool("EXIF_TRANSPOSE", self.exif_transpose)
        _check_bool("APPLY_ROTATION", self.apply_rotation)
        _check_int("MAX_PIXELS", self.max_pixels, 1)
        _check_s3_endpoint_url(self.s3_endpoint_url)
        _check_bool("RETRY_FAILED", self.retry_failed)
        _check_bool("STOP_IF_UNREACHABLE", self.stop_if_unreachable)


@dataclasses.dataclass(frozen=True)
class MergeParams:
    """Parameters of 03_merge."""

    output_file: str | None
    cleanup: bool
    output_dir: str = DEFAULT_OUTPUT_DIR

    def __post_init__(self) -> None:
        _check_output_dir(self.output_dir)
        _check_text("OUTPUT_FILE", self.output_file, optional=True)
        _check_bool("CLEANUP", self.cleanup)


INDEXES = ("exact", "ivf")
EXPORTS = ("npy", "parquet")


@dataclasses.dataclass(frozen=True)
class SearchParams:
    """Parameters of 04_search."""

    embeddings: str | None
    queries: list[str]
    image_query: str | None
    top_k: int
    index: str
    model: str | None
    device: str
    export: str | None
    pca_dim: int | None
    s3_endpoint_url: str | None
    output_dir: str = DEFAULT_OUTPUT_DIR
    allow_other_model: bool = False

    def __post_init__(self) -> None:
        _check_output_dir(self.output_dir)
        _check_text("EMBEDDINGS", self.embeddings, optional=True)
        _check_s3_endpoint_url(self.s3_endpoint_url)
        _check_bool("ALLOW_OTHER_MODEL", self.allow_other_model)
        if not isinstance(self.queries, list) or not all(
            isinstance(q, str) and q.strip() for q in self.queries
        ):
            raise ParameterError(
                f"QUERIES={self.queries!r} is not allowed: use a list of non-empty texts, such as "
                "['a dog on a beach'], or [] for none."
            )
        _check_text("IMAGE_QUERY", self.image_query, optional=True)
        _check_int("TOP_K", self.top_k, 1)
        _check_choice("INDEX", self.index, INDEXES)
        _check_text("MODEL", self.model, optional=True)
        _check_device("DEVICE", self.device)
        if self.export is not None:
            _check_choice("EXPORT", self.export, EXPORTS)
        if self.pca_dim is not None:
            _check_int("PCA_DIM", self.pca_dim, 1)
            if self.export is None:
                raise ParameterError(
                    f"PCA_DIM={self.pca_dim} reduces the exported vectors, and EXPORT=None exports none: "
                    "set EXPORT='npy' or 'parquet' as well, or PCA_DIM=None."
                )


STAGE_PARAMETERS = (SetupParams, MetadataParams, EmbedParams, MergeParams, SearchParams)


def _parameter_names(params_class: type) -> list[str]:
    return [field.name.upper() for field in dataclasses.fields(params_class)]


def read_parameters(params_class: type, namespace: dict[str, Any]) -> Any:
    """Validate a stage's parameters from a notebook's globals.

    An UPPER_CASE name that no stage knows is an error when papermill injected it (a typo in
    `-p` or `-f`, which papermill itself only warns about) or when it is close to a known name;
    any other is a variable of the notebook's own, and only warned about. Names of other stages
    are allowed, so one params/*.yaml serves all.
    """
    known = {name for stage in STAGE_PARAMETERS for name in _parameter_names(stage)}
    injected = _injected_names(namespace)
    for name in sorted(n for n in namespace if _PARAMETER_NAME.fullmatch(n) and n not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6 if name in injected else 0.8)
        if name in injected or close:
            hint = f"did you mean {close[0]}? " if close else ""
            raise ParameterError(
                f"Unknown parameter {name}={namespace[name]!r}: {hint}"
                f"the parameters are {', '.join(sorted(known))}."
            )
        warnings.warn(
            f"{name} is not a parameter of any stage: it is taken as a variable of this notebook's own.",
            stacklevel=2,
        )
    missing = [name for name in _parameter_names(params_class) if name not in namespace]
    if missing:
        raise ParameterError(
            f"Parameter {', '.join(missing)} is not defined: restore it in the parameters cell."
        )
    return params_class(**{name.lower(): namespace[name] for name in _parameter_names(params_class)})


def _injected_names(namespace: dict[str, Any]) -> set[str]:
    """The names that papermill's injected cell assigned, found in the kernel's input history (`In`).

    Papermill (and `papermill --prepare-only` before nbval) adds one cell that begins with
    "# Parameters"; the notebook's own cells are not its.
    """
    names = set()
    for source in namespace.get("In", []):
        if isinstance(source, str) and source.startswith("# Parameters"):
            with contextlib.suppress(SyntaxError):
                tree = ast.parse(source)
                names |= {
                    node.id
                    for node in ast.walk(tree)
                    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
                }
    return names


# ---------------------------------------------------------------------------------------------
# Paths and downloads
# ---------------------------------------------------------------------------------------------

HTTP_TIMEOUT = (10, 60)  # seconds to connect, seconds between bytes
FETCH_DEADLINE = 300  # seconds for one image's fetch, retries and waits included: nothing stalls a run
MAX_IMAGE_BYTES = 512 << 20  # a larger body is not an image to embed ("too large"), and is not read
# urllib3 logs a warning for each retried request: thousands of lines in a notebook on a bad day.
# The ledger records what still failed after the retries.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


class _PastDeadline(Exception):
    """A retry would wait past the fetch's deadline; `status` is the answer it would have retried."""

    def __init__(self, status: int | None):
        super().__init__(status)
        self.status = status


class DeadlineRetry(urllib3.Retry):
    """urllib3's Retry that never waits past the deadline of the fetch under way in this thread.

    A server's Retry-After (which urllib3 honours, for up to 6 hours) or a backoff that would end
    after the deadline ends the fetch at once, as the failure of the answer it would have retried.
    """

    deadlines = threading.local()  # a class attribute: shared by the copies urllib3 makes of a Retry

    def sleep(self, response: Any = None) -> None:
        retry_after = self.get_retry_after(response) if response and self.respect_retry_after_header else None
        self._check_deadline(retry_after or self.get_backoff_time(), response)
        super().sleep(response)

    def sleep_for_retry(self, response: Any) -> bool:
        self._check_deadline(self.get_retry_after(response) or 0, response)
        return super().sleep_for_retry(response)

    @staticmethod
    def _check_deadline(wait: float, response: Any) -> None:
        deadline = getattr(DeadlineRetry.deadlines, "at", None)
        if deadline is not None and time.monotonic() + wait > deadline:
            raise _PastDeadline(response.status if response is not None else None)


HTTP_RETRY = DeadlineRetry(
    total=4,
    read=2,
    backoff_factor=0.5,
    status_forcelist=(429, 500, 502, 503, 504),
    allowed_methods=("GET", "HEAD"),
    raise_on_status=False,
)


def resolve_path(path: str | os.PathLike) -> Path:
    """A user's path: '~' expanded, relative paths taken from the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else WORKSPACE.root / path


def collection(output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR) -> Collection:
    """The collection in OUTPUT_DIR (a relative path starts at the repository root)."""
    return Collection(resolve_path(output_dir))


LOCATION_SCHEMES = ("http", "https", "s3", "file")  # what 02 fetches as it is; anything else is a path


def _is_url(text: str) -> bool:
    return urlparse(text).scheme in ("http", "https")


def _is_google_drive(text: str) -> bool:
    return urlparse(text).hostname in ("drive.google.com", "docs.google.com")


def http_session(pool_size: int = 10) -> requests.Session:
    """A requests session that retries transient failures (urllib3's Retry) with backoff."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(
        max_retries=HTTP_RETRY, pool_connections=pool_size, pool_maxsize=pool_size
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_and_replace(temporary: Path, final: Path) -> None:
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
def _atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it whole on success and is removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        _fsync_and_replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_json(path: Path, record: dict) -> None:
    """Write a JSON record whole or not at all."""
    with _atomic_file(path) as temporary:
        temporary.write_text(json.dumps(record, indent=1))


def _read_json(path: Path) -> dict:
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
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise PipelineError(
            f"Not enough disk space for {purpose}: it needs about {needed / 2**30:,.2f} GiB in {folder}, "
            f"and {free / 2**30:,.2f} GiB is free. Free some space, or make OUTPUT/ a link to a larger disk."
        )


def _cached_download_is_valid(path: Path, record_path: Path, url: str) -> bool:
    if not path.is_file():
        return False
    record = _read_json(record_path)
    return (
        record.get("url") == url
        and record.get("size") == path.stat().st_size
        and record.get("sha256") == _sha256_of_file(path)
    )


def _root_cause(error: requests.RequestException) -> Any:
    """The urllib3 error behind a requests error (a MaxRetryError holds the last attempt's)."""
    cause = error.args[0] if error.args else None
    return getattr(cause, "reason", cause)


def _network_problem(error: requests.RequestException, url: str) -> str:
    """A few words on why a request failed, instead of urllib3's chain of wrapped errors."""
    host = urlparse(url).netloc
    cause = _root_cause(error)
    if isinstance(cause, urllib3.exceptions.NameResolutionError):
        return f"cannot resolve {urlparse(url).hostname} (is this machine offline?)"
    if isinstance(cause, urllib3.exceptions.NewConnectionError):
        return f"cannot connect to {host}"
    if isinstance(error, requests.Timeout) or isinstance(cause, urllib3.exceptions.TimeoutError):
        return f"{host} did not answer in time"
    return str(error).splitlines()[0]


def _download_http(url: str, destination: Path) -> None:
    """Stream `url` into `destination`, checking that every announced byte arrived."""
    with http_session() as session, session.get(url, stream=True, timeout=HTTP_TIMEOUT) as reply:
        if reply.status_code != 200:
            raise OSError(f"the server answered HTTP {reply.status_code}")
        expected = int(reply.headers.get("Content-Length", 0)) or None
        with (
            open(destination, "wb") as file,
            progress_bar(
                total=expected, unit="B", unit_scale=True, desc=f"download {Path(urlparse(url).path).name}"
            ) as progress,
        ):
            for block in reply.iter_content(1 << 20):
                file.write(block)
                progress.update(reply.raw.tell() - progress.n)
        received = reply.raw.tell()  # bytes over the wire, as Content-Length counts a gzip-encoded body
    if expected is not None and received != expected:
        raise OSError(f"received {received} of {expected} bytes")


def _download_google_drive(url: str, folder: Path) -> Path:
    """Fetch a Google Drive link with gdown, keeping the file's own name (and so its extension)."""
    import gdown

    saved = gdown.download(url, output=str(folder) + os.sep, quiet=False, fuzzy=True)
    if not saved:
        raise OSError("gdown could not fetch it (is the file shared with 'anyone with the link'?)")
    return Path(saved)


def cached_download(url: str, hint: str) -> Path:
    """A verified local copy of `url` under .cache/downloads/, fetched once and checked by size and hash.

    `hint` tells the user what to do when the URL cannot be reached.
    """
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    folder = WORKSPACE.downloads / key
    for record_path in folder.glob("*.download.json"):
        path = record_path.with_name(record_path.name.removesuffix(".download.json"))
        if _cached_download_is_valid(path, record_path, url):
            print(f"Using the cached copy of {url} ({path})")
            return path
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory(dir=folder) as partial:
            if _is_google_drive(url):
                fetched = _download_google_drive(url, Path(partial))
            else:
                fetched = Path(partial) / (Path(urlparse(url).path).name or "download")
                _download_http(url, fetched)
            path = folder / fetched.name
            _fsync_and_replace(fetched, path)
    except (OSError, requests.RequestException) as error:
        shutil.rmtree(folder, ignore_errors=True)
        problem = _network_problem(error, url) if isinstance(error, requests.RequestException) else error
        raise PipelineError(f"Could not download {url}: {problem}. {hint}") from None
    record = {"url": url, "size": path.stat().st_size, "sha256": _sha256_of_file(path)}
    _write_json(path.with_name(path.name + ".download.json"), record)
    return path


def _local_copy(source: str, hint: str) -> Path:
    """A local file for a SOURCE that is a path, an http(s) URL or a Google Drive link."""
    if _is_url(source):
        return cached_download(source, hint)
    path = resolve_path(source)
    if not path.is_file():
        raise PipelineError(f"SOURCE file {path} does not exist. {hint}")
    return path


# ---------------------------------------------------------------------------------------------
# Sources: metadata -> the image table (row i: image_id, url, location to fetch, rotation)
# ---------------------------------------------------------------------------------------------

OPENIMAGES_METADATA = {
    "train": "https://storage.googleapis.com/openimages/2018_04/train/train-images-boxable-with-rotation.csv",
    "validation": "https://storage.googleapis.com/openimages/2018_04/validation/validation-images-with-rotation.csv",
    "test": "https://storage.googleapis.com/openimages/2018_04/test/test-images-with-rotation.csv",
}
OPENIMAGES_BUCKET = "open-images-dataset"
TABLE_COLUMNS = ("image_id", "url", "location", "rotation", "md5")
_LISTING_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".csv": lambda path: pd.read_csv(path, dtype=str, keep_default_na=False),
    ".tsv": lambda path: pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False),
    ".json": lambda path: _frame_from_json(json.loads(path.read_text())),
    ".jsonl": lambda path: pd.read_json(path, lines=True, dtype=False),
    ".parquet": pd.read_parquet,
}


def _openimages_table(params: MetadataParams) -> pd.DataFrame:
    """The official Open Images metadata CSV of SPLIT, fetched from S3 keys or OriginalURL."""
    source = params.source or OPENIMAGES_METADATA[params.split]
    hint = "Check the network, or download the metadata CSV elsewhere and set SOURCE to its path or URL."
    path = _local_copy(source, hint)
    usecols = ("ImageID", "Subset", "OriginalURL", "OriginalMD5", "Rotation")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=lambda c: c in usecols)
    missing = {"ImageID", "OriginalURL"} - set(frame.columns)
    if missing:
        raise PipelineError(
            f"{source} is not in the official Open Images format: it lacks {sorted(missing)} "
            f"(its columns are {list(frame.columns)}). Use DATASET='table' for other listings."
        )
    if "Subset" in frame.columns:
        _check_subset(frame["Subset"], params, source)
    ids = frame["ImageID"]
    if params.fetch == "s3":
        location = f"s3://{OPENIMAGES_BUCKET}/{params.split}/" + ids + ".jpg"
    else:
        location = frame["OriginalURL"]
    rotation = pd.to_numeric(frame["Rotation"], errors="coerce") if "Rotation" in frame.columns else np.nan
    # OriginalMD5 is the digest of the Flickr original: it checks OriginalURL's bytes, not the S3 copy's
    checked = params.fetch == "url" and "OriginalMD5" in frame.columns
    md5 = _md5_column(frame["OriginalMD5"], source) if checked else ""
    return pd.DataFrame(
        {"image_id": ids, "url": frame["OriginalURL"], "location": location, "rotation": rotation, "md5": md5}
    )


def _check_subset(subsets: pd.Series, params: MetadataParams, source: str) -> None:
    """The CSV's Subset column must be SPLIT, which names the table's split (and its S3 folder)."""
    other = subsets[subsets != params.split]
    if len(other):
        found = _counted(collections.Counter(other))
        keys = (
            f"their S3 keys are not under {params.split}/"
            if params.fetch == "s3"
            else "SPLIT would mislabel them"
        )
        raise PipelineError(
            f"{source} lists images of another split than SPLIT={params.split!r} in its Subset column "
            f"({found} row(s)): {keys}. Set SPLIT to the CSV's split, or give the CSV of {params.split!r} "
            "as SOURCE."
        )


def _frame_from_json(data: Any) -> pd.DataFrame:
    """A table from JSON records ([{...}, ...]) or columns ({"image_id": [...], "url": [...]})."""
    if isinstance(data, list) and all(isinstance(record, dict) for record in data):
        return pd.DataFrame.from_records(data)
    if isinstance(data, dict) and all(isinstance(column, list) for column in data.values()):
        return pd.DataFrame(data)
    raise ValueError("expected a list of records or an object of equally long lists")


def _read_listing(path: Path) -> pd.DataFrame:
    reader = _LISTING_READERS.get(path.suffix.lower())
    if reader is None:
        raise PipelineError(
            f"Cannot read the table {path.name}: use a file ending in {', '.join(_LISTING_READERS)}."
        )
    try:
        return reader(path)
    except (ValueError, OSError, pa.ArrowException) as error:
        raise PipelineError(f"Cannot read the table {path}: {error}") from None


def _read_json_list(source: str, column: str) -> list:
    path = _local_copy(source, f"Check SOURCE[{column!r}].")
    try:
        values = json.loads(path.read_text())
    except ValueError as error:
        raise PipelineError(f"SOURCE[{column!r}] ({source}) is not valid JSON: {error}") from None
    if not isinstance(values, list):
        raise PipelineError(f"SOURCE[{column!r}] ({source}) must hold a JSON list.")
    return values


def _table_from_columns(sources: dict[str, str]) -> pd.DataFrame:
    """A table from one JSON list per column (the original notebook's image_ids.json, image_urls.json)."""
    columns = {column: _read_json_list(source, column) for column, source in sources.items()}
    lengths = {column: len(values) for column, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise PipelineError(f"The JSON lists of SOURCE differ in length: {lengths}.")
    return pd.DataFrame(columns)


def _resolve_locations(urls: pd.Series, base: str) -> pd.Series:
    """Relative paths in a listing point next to the listing itself (a folder or a URL)."""

    def resolve(url: str) -> str:
        if urlparse(url).scheme in LOCATION_SCHEMES or os.path.isabs(url):
            return url
        return urljoin(base, url) if _is_url(base) else str(Path(base) / url)

    return urls.map(resolve)


def _listing_table(params: MetadataParams) -> pd.DataFrame:
    """A user's CSV, JSON or Parquet listing with at least `image_id` and `url` columns."""
    if isinstance(params.source, dict):
        frame, base = _table_from_columns(params.source), str(WORKSPACE.root)
    else:
        path = _local_copy(params.source, "Check SOURCE, or copy the table here and give its path.")
        frame = _read_listing(path)
        base = params.source if _is_url(params.source) else str(path.parent)
    missing = {"image_id", "url"} - set(frame.columns)
    if missing:
        raise PipelineError(
            f"The table {params.source} lacks the column(s) {sorted(missing)}; "
            f"its columns are {list(frame.columns)}. Rename them to image_id and url."
        )
    _check_no_missing_values(frame, ("image_id", "url"), params.source)
    urls = frame["url"].astype(str)
    return pd.DataFrame(
        {
            "image_id": frame["image_id"].astype(str),
            "url": urls,
            "location": _resolve_locations(urls, base),
            "rotation": _rotation_column(frame),
            "md5": _md5_column(frame["md5"], params.source) if "md5" in frame.columns else "",
        }
    )


_MD5_HEX = re.compile(r"[0-9a-fA-F]{32}")


def _md5_column(values: pd.Series, source: Any) -> pd.Series:
    """MD5 digests as lowercase hex ('' where unknown), from hex or from base64 (Open Images' OriginalMD5)."""

    def hexadecimal(value: str) -> str | None:
        value = value.strip()
        if not value or _MD5_HEX.fullmatch(value):
            return value.lower()
        try:
            digest = base64.b64decode(value, validate=True)
        except ValueError:
            return None
        return digest.hex() if len(digest) == 16 else None

    digests = values.fillna("").astype(str).map(hexadecimal)
    bad = digests.index[digests.isna()]
    if len(bad):
        raise PipelineError(
            f"The listing {source} has {len(bad)} md5 value(s) that are neither 32 hex digits nor the "
            f"base64 of 16 bytes, e.g. {values[bad[0]]!r} in row {bad[0]}. Fix them, or leave them empty."
        )
    return digests


def _rotation_column(frame: pd.DataFrame) -> pd.Series | float:
    """A listing's optional `rotation` column, in degrees counter-clockwise; NaN where absent."""
    if "rotation" not in frame.columns:
        return np.nan
    return frame["rotation"].replace("", np.nan)  # checked with the rest of the table


def _image_extensions() -> set[str]:
    """File extensions of every format Pillow can open."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _folder_table(params: MetadataParams) -> pd.DataFrame:
    """Every image file under a folder, recursively, sorted; image_id is the relative path."""
    folder = resolve_path(params.source)
    if not folder.is_dir():
        raise PipelineError(f"SOURCE folder {folder} does not exist or is not a folder.")
    extensions = _image_extensions()
    relative = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.suffix.lower() in extensions
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    paths = [str(folder / name) for name in relative]
    return pd.DataFrame(
        {"image_id": relative, "url": paths, "location": paths, "rotation": np.nan, "md5": ""}
    )


def _check_no_missing_values(frame: pd.DataFrame, columns: Iterable[str], source: Any) -> None:
    for column in columns:
        empty = frame.index[frame[column].isna() | (frame[column].astype(str).str.strip() == "")]
        if len(empty):
            raise PipelineError(
                f"The table {source} has {len(empty)} row(s) with an empty {column}, "
                f"e.g. row(s) {list(empty[:5])}. Fill or remove them."
            )


def _check_table(table: pd.DataFrame, source: Any) -> None:
    if table.empty:
        raise PipelineError(f"The listing {source} holds no images.")
    rotation = pd.to_numeric(table["rotation"], errors="coerce")
    odd = table.index[table["rotation"].notna() & ~rotation.isin([0, 90, 180, 270])]
    if len(odd):
        raise PipelineError(
            f"The listing {source} has {len(odd)} row(s) whose rotation is not 0, 90, 180 or 270 "
            f"(degrees counter-clockwise), e.g. row(s) {list(odd[:5])}. Fix them, or leave them empty."
        )
    duplicated = table["image_id"][table["image_id"].duplicated(keep=False)]
    if len(duplicated):
        examples = duplicated.value_counts().head(5).to_dict()
        raise PipelineError(
            f"The listing {source} has {duplicated.nunique()} duplicate image_id value(s), "
            f"e.g. {examples} (id: count). Each image_id must be unique."
        )


def build_image_table(params: MetadataParams) -> pd.DataFrame:
    """The normalised image table of a dataset: image_id, url, location (what to fetch), rotation, md5."""
    builders = {"openimages-v7": _openimages_table, "table": _listing_table, "folder": _folder_table}
    table = builders[params.dataset](params).reset_index(drop=True)
    _check_table(table, params.source or OPENIMAGES_METADATA.get(params.split))
    return table.astype({"image_id": str, "url": str, "location": str, "rotation": "float64", "md5": str})


def table_sha256(table: pd.DataFrame) -> str:
    """A digest of the table's content (not its file), so an unchanged table keeps its chunks.

    It covers which image each row is (id, url, location, rotation), not the md5s that check their
    bytes: checksums added to a listing later leave its chunks valid.
    """
    return _columns_sha256(table, ("image_id", "url", "location"), ("rotation",))


def _columns_sha256(table: pd.DataFrame, texts: Sequence[str], numbers: Sequence[str] = ()) -> str:
    """A digest of some columns of the table, read 100,000 rows at a time."""
    digest = hashlib.sha256()
    for start in range(0, len(table), 100_000):
        block = table.iloc[start : start + 100_000]
        for column in texts:
            digest.update("\0".join(block[column]).encode() + b"\1")
        for column in numbers:
            digest.update(block[column].to_numpy(np.float64).tobytes())
    return digest.hexdigest()


TABLE_INFO_KEY = b"clip_image_embeddings.table"  # the table's info, kept in the Parquet file's metadata


def save_image_table(table: pd.DataFrame, params: MetadataParams, collection: Collection) -> dict:
    """Write the table and its info into the collection, as one file, atomically; return the info.

    The same table (same info) is left as it is, so the chunks made from it stay valid.
    """
    info = {
        "dataset": params.dataset,
        "split": params.split if params.dataset == "openimages-v7" else None,
        "source": params.source or OPENIMAGES_METADATA.get(params.split),
        "fetch": params.fetch if params.dataset == "openimages-v7" else None,
        "rows": len(table),
        "sha256": table_sha256(table),
        "md5_sha256": _columns_sha256(table, ("md5",)),  # so that new checksums are saved too
    }
    _move_earlier_table(collection)
    if _table_info(collection.table) == info:
        print(f"The image table is already up to date: {len(table):,} rows in {collection.table}")
        return info
    _write_table(pa.Table.from_pandas(table, preserve_index=False), info, collection.table)
    print(f"Wrote the image table: {len(table):,} rows to {collection.table}")
    return info


TABLE_ROW_GROUP = 65_536  # rows per Parquet row group: a few rows can be read without the whole table


def _write_table(table: pa.Table, info: dict, path: Path) -> None:
    """The table with its info in the file's metadata, so that no kill can pair one with another's."""
    metadata = {**(table.schema.metadata or {}), TABLE_INFO_KEY: json.dumps(info).encode()}
    with _atomic_file(path) as temporary:
        pq.write_table(table.replace_schema_metadata(metadata), temporary, row_group_size=TABLE_ROW_GROUP)


def table_values(path: Path, column: str, rows: Sequence[int]) -> list:
    """One column of an image table at the given rows, reading only the row groups that hold them."""
    file = pq.ParquetFile(path)
    sizes = [file.metadata.row_group(group).num_rows for group in range(file.num_row_groups)]
    starts = np.cumsum([0, *sizes])
    rows = np.asarray(rows, dtype=np.int64)
    groups = np.searchsorted(starts, rows, side="right") - 1
    values = np.empty(len(rows), dtype=object)
    for group in np.unique(groups):
        held = groups == group
        column_values = file.read_row_group(int(group), columns=[column]).column(0)
        values[held] = column_values.take(pa.array(rows[held] - starts[group])).to_pylist()
    return values.tolist()


def _table_info(path: Path) -> dict | None:
    """The info an image table file records; None when there is no such file, or it records none."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):  # missing, or not a whole Parquet file
        return None
    return json.loads(metadata[TABLE_INFO_KEY]) if TABLE_INFO_KEY in metadata else None


def _move_earlier_table(collection: Collection) -> None:
    """Move the table that versions without OUTPUT_DIR kept in .cache/ into OUTPUT/, where its chunks are."""
    earlier = WORKSPACE.earlier_table
    record = _read_json(earlier.with_suffix(".json"))
    if collection.folder != resolve_path(DEFAULT_OUTPUT_DIR) or collection.table.exists():
        return
    if not (earlier.is_file() and record):
        return
    table = pq.read_table(earlier)
    if "md5" not in table.column_names:  # no checksums then
        table = table.append_column("md5", pa.array([""] * table.num_rows, pa.large_string()))
    _write_table(table, record, collection.table)
    earlier.unlink()  # first: the marker that 02's checks look for
    earlier.with_suffix(".json").unlink()
    print(f"Moved the image table of {collection.folder} from {earlier}, where earlier versions kept it.")


@dataclasses.dataclass(frozen=True)
class ImageTable:
    """The image table as 02 reads it: Arrow columns, sliced one chunk at a time."""

    columns: pa.Table
    info: dict

    def __len__(self) -> int:
        return self.columns.num_rows

    def rows(self, start: int, end: int) -> dict[str, list]:
        """The columns of rows [start, end) as Python lists."""
        return self.columns.slice(start, end - start).to_pydict()

    def take(self, row_numbers: Sequence[int]) -> dict[str, list]:
        """The columns of the given rows, in that order, as Python lists."""
        if isinstance(row_numbers, range) and row_numbers.step == 1:
            return self.rows(row_numbers.start, row_numbers.stop)
        return self.columns.take(pa.array(row_numbers, pa.int64())).to_pydict()


def load_image_table(collection: Collection) -> ImageTable:
    """The table that 01_metadata wrote into the collection."""
    _move_earlier_table(collection)
    info = _table_info(collection.table)
    if info is None:
        raise PipelineError(_no_table(collection))
    return ImageTable(pq.read_table(collection.table, columns=list(TABLE_COLUMNS)), info)


def _no_table(collection: Collection) -> str:
    """Why a collection has no image table, and what to do."""
    again = f"run 01_metadata with OUTPUT_DIR={str(collection.folder)!r}"
    if collection.table.exists():
        return f"{collection.table} is not an image table that 01_metadata wrote (it is damaged): {again}."
    message = f"There is no image table in {collection.folder}: {again} first."
    if WORKSPACE.earlier_table.is_file():
        message += (
            f" ({WORKSPACE.earlier_table}, made by an earlier version, is the table of the collection in "
            f"{resolve_path(DEFAULT_OUTPUT_DIR)}: it moves there when 01_metadata or 02_embed runs with "
            f"OUTPUT_DIR={DEFAULT_OUTPUT_DIR!r}.)"
        )
    return message


# ---------------------------------------------------------------------------------------------
# Fetch: the bytes of one image from S3, HTTP(S) or the local disk
# ---------------------------------------------------------------------------------------------


class Fetcher:
    """Bytes of images from S3 (unsigned, like Open Images' downloader.py), HTTP(S) or files.

    Transient failures are retried by the libraries' own mechanisms (botocore's retry modes,
    urllib3's Retry). Every request has timeouts, every body a deadline and a size limit; what
    still fails raises ImageFailure with a stable reason.
    """

    def __init__(
        self,
        s3_endpoint_url: str | None = None,
        pool_size: int = 10,
        timeout: tuple[float, float] | None = None,
        deadline: float | None = None,
        max_bytes: int | None = None,
    ):
        """None: HTTP_TIMEOUT, FETCH_DEADLINE and MAX_IMAGE_BYTES."""
        self._timeout = timeout or HTTP_TIMEOUT
        self._deadline = deadline or FETCH_DEADLINE
        self._max_bytes = max_bytes or MAX_IMAGE_BYTES
        self._http = http_session(pool_size)
        self._s3_endpoint_url = s3_endpoint_url
        self._pool_size = pool_size
        self._s3_client_lock = threading.Lock()

    @functools.cached_property
    def _s3(self) -> Any:
        """An unsigned S3 client, made at the first S3 location: boto3 takes a while to load."""
        import boto3
        import botocore.config

        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=self._s3_endpoint_url,
            region_name=session.region_name or "us-east-1",
            config=botocore.config.Config(
                signature_version=botocore.UNSIGNED,
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=self._timeout[0],
                read_timeout=self._timeout[1],
                max_pool_connections=self._pool_size,
            ),
        )

    def fetch(self, location: str) -> bytes:
        """The bytes at `location`: s3://bucket/key, http(s)://..., file://... or a path."""
        parsed = urlparse(location)
        if parsed.scheme == "s3":
            data = self._fetch_s3(parsed.netloc, parsed.path.lstrip("/"))
        elif parsed.scheme in ("http", "https"):
            data = self._fetch_http(location)
        else:
            data = self._fetch_file(parsed.path if parsed.scheme == "file" else location)
        if not data:
            raise ImageFailure("empty body")
        return data

    def _read_body(self, blocks: Iterable[bytes], announced: int | None, began: float) -> bytes:
        """A response body read block by block, within the deadline and the size limit."""
        if announced is not None and announced > self._max_bytes:
            raise ImageFailure("too large")
        body, size = [], 0
        for block in blocks:
            size += len(block)
            if size > self._max_bytes:
                raise ImageFailure("too large")
            if time.monotonic() - began > self._deadline:
                raise ImageFailure("timeout")
            body.append(block)
        return b"".join(body)

    def _fetch_s3(self, bucket: str, key: str) -> bytes:
        import botocore.exceptions

        with self._s3_client_lock:  # the first S3 fetches wait for one client rather than each make one
            client = self._s3
        began = time.monotonic()
        try:
            reply = client.get_object(Bucket=bucket, Key=key)
            with contextlib.closing(reply["Body"]) as body:
                return self._read_body(body.iter_chunks(1 << 16), reply.get("ContentLength"), began)
        except botocore.exceptions.ClientError as error:
            raise ImageFailure(f"s3 {error.response['Error']['Code']}") from None
        except (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError):
            raise ImageFailure("timeout") from None
        except (botocore.exceptions.IncompleteReadError, urllib3.exceptions.ProtocolError):
            raise ImageFailure("truncated body") from None
        except botocore.exceptions.BotoCoreError as error:
            unresolved = (urllib3.exceptions.NameResolutionError, socket.gaierror)
            resolved = not isinstance(getattr(error, "kwargs", {}).get("error"), unresolved)
            raise ImageFailure("connection error" if resolved else "cannot resolve") from None

    def _fetch_http(self, url: str) -> bytes:
        began = time.monotonic()
        DeadlineRetry.deadlines.at = began + self._deadline  # retries and their waits count too
        try:
            with self._http.get(url, timeout=self._timeout, stream=True) as reply:
                if reply.status_code != 200:
                    raise ImageFailure(f"http {reply.status_code}")
                announced = reply.headers.get("Content-Length")
                announced = int(announced) if announced and announced.isdigit() else None
                # read1 returns what has arrived, so a body that trickles in meets the deadline
                blocks = iter(functools.partial(reply.raw.read1, 1 << 16, decode_content=True), b"")
                return self._read_body(blocks, announced, began)
        except (requests.Timeout, urllib3.exceptions.ReadTimeoutError):
            raise ImageFailure("timeout") from None
        except (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError):
            raise ImageFailure("truncated body") from None
        except requests.ConnectionError as error:
            # a read timeout mid-body, or after the last retry, arrives as a ConnectionError
            cause = _root_cause(error)
            if isinstance(cause, urllib3.exceptions.NameResolutionError):
                raise ImageFailure("cannot resolve") from None
            timed_out = isinstance(cause, urllib3.exceptions.ReadTimeoutError)
            raise ImageFailure("timeout" if timed_out else "connection error") from None
        except requests.RequestException as error:
            raise ImageFailure(f"http error: {type(error).__name__}") from None
        except _PastDeadline as past:
            raise ImageFailure(f"http {past.status}" if past.status else "timeout") from None
        finally:
            DeadlineRetry.deadlines.at = None

    def _fetch_file(self, path: str) -> bytes:
        try:
            with open(path, "rb") as file:
                if os.fstat(file.fileno()).st_size > self._max_bytes:
                    raise ImageFailure("too large")
                return file.read()
        except FileNotFoundError:
            raise ImageFailure("file not found") from None
        except OSError as error:
            raise ImageFailure(f"file unreadable: {error.strerror or type(error).__name__}") from None


# ---------------------------------------------------------------------------------------------
# Decode and preprocess: OpenAI CLIP's transform, without torchvision
# ---------------------------------------------------------------------------------------------

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSING_RULE = (
    "openai-clip: first frame; 16-bit and float images (I;16, I, F) to 8-bit grey by their own "
    "min..max; Resize(n_px, bicubic) of the shortest side (long side int(n_px*long/short), "
    "no resample when short == n_px); CenterCrop(n_px) at int(round((size - n_px) / 2)); "
    "convert('RGB'); /255; normalise with mean and std"
)
DEFAULT_MAX_PIXELS = 100_000_000
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}

# MAX_PIXELS replaces Pillow's process-wide decompression-bomb limit: decode_image checks each
# image's size from its header, before decoding, against the run's own limit.
Image.MAX_IMAGE_PIXELS = None
# Pillow warns about each odd file (corrupt EXIF, oversized tags); over millions of images that
# floods a notebook, and the ledger already records every image that failed.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def _quiet_libtiff() -> None:
    """Stop libtiff printing each corrupt TIFF's complaints to stderr, which a notebook shows (Linux).

    Only libtiff's own messages go: a TIFF it cannot decode still fails with its reason.
    """
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return
    from PIL import _imaging  # noqa: F401 (loads the libtiff that Pillow decodes with)

    loaded = {line.split()[-1] for line in maps.read_text().splitlines() if "libtiff" in line}
    for path in loaded:
        libtiff = ctypes.CDLL(path)
        for set_handler in (libtiff.TIFFSetWarningHandler, libtiff.TIFFSetErrorHandler):
            set_handler.restype = ctypes.c_void_p
            set_handler.argtypes = [ctypes.c_void_p]
            set_handler(None)


_quiet_libtiff()


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """The first frame of an image, decoded; bad bytes or too many pixels raise ImageFailure.

    With `draft_size`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft mode) as long as
    its short side stays at least `draft_size`: faster, and close to, not equal to, a full decode.
    """
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ImageFailure("too many pixels")
        if draft_size and image.format == "JPEG":
            scale = draft_size / min(image.size)
            image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()
    except UnidentifiedImageError:
        raise ImageFailure("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, NotImplementedError) as error:
        raise ImageFailure(_decode_reason(error)) from None
    return image


_TRUNCATION_SIGNS = ("truncated", "not enough image data", "expected to read", "incomplete", "premature end")


def _decode_reason(error: Exception) -> str:
    """A stable reason for an image that Pillow could not decode; the details vary with each file."""
    message = str(error).lower()
    if any(sign in message for sign in _TRUNCATION_SIGNS) or isinstance(error, EOFError):
        return "decode: truncated file"
    if "ghostscript" in message:
        return "decode: EPS needs Ghostscript"
    return "decode: corrupt data"


def rotate(image: Image.Image, degrees: float | None) -> Image.Image:
    """Rotate counter-clockwise by 0, 90, 180 or 270 degrees (Open Images' Rotation); NaN, None: as is."""
    return image.transpose(_ROTATIONS[int(degrees)]) if degrees in _ROTATIONS else image


def to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit and float images as 8-bit grey, their own min..max stretched to 0..255; others as they are.

    Each value v becomes rint((v - min) / (max - min) * 255) in float64, over the finite values;
    NaN counts as min, +inf as max. Pillow would clip at 255 (a white image). A constant image is black.
    """
    if image.mode not in HIGH_DEPTH_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low
    if high > low:
        values = np.rint(values / (high - low) * 255)  # float64; halves to even
    return Image.fromarray(values.astype(np.uint8), "L")


def _resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) on a PIL image: bicubic, long side int(size * long / short)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop(size) of an image at least `size` on each side."""
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """OpenAI CLIP's `preprocess`: resize, center crop, RGB, scale and normalise; float32 CHW."""

    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = to_8_bits(image)
        try:
            image = _center_crop(_resize_shortest_side(image, self.image_size), self.image_size)
            image = image.convert("RGB")
        except ValueError:
            raise ImageFailure(f"decode: unsupported mode {image.mode}") from None
        channels = np.asarray(image)
        pixels = np.empty((3, *channels.shape[:2]), np.float32)
        for channel, values in enumerate(self._normalised_values):
            np.take(values, channels[..., channel], out=pixels[channel])
        return pixels

    @functools.cached_property
    def _normalised_values(self) -> np.ndarray:
        """(3, 256): each channel's byte values scaled to [0, 1] and normalised, in float32.

        Looking values up gives the very floats that computing them image by image would.
        """
        scaled = np.arange(256, dtype=np.float32)[:, None] / np.float32(255)
        return np.ascontiguousarray(((scaled - np.float32(self.mean)) / np.float32(self.std)).T)

    def describe(self) -> dict:
        """What a chunk file records about the preprocessing."""
        return {
            "image_size": self.image_size,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "preprocessing": PREPROCESSING_RULE,
        }


@dataclasses.dataclass(frozen=True)
class ImageRecipe:
    """Everything 02 does to an image's bytes before the model: decode, orient, preprocess."""

    preprocessing: Preprocessing
    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_transpose: bool = False
    apply_rotation: bool = False
    preprocess: str = "exact"  # or "fast": JPEGs decoded in draft mode

    def __call__(self, data: bytes, rotation: float | None = None) -> np.ndarray:
        draft_size = self.preprocessing.image_size if self.preprocess == "fast" else None
        image = decode_image(data, self.max_pixels, draft_size)
        if self.exif_transpose:
            image = ImageOps.exif_transpose(image)
        if self.apply_rotation:
            image = rotate(image, rotation)
        return self.preprocessing(image)

    def describe(self) -> dict:
        """The recipe's own options, as chunk files record them (the preprocessing is the encoder's)."""
        return {
            "preprocess": self.preprocess,
            "exif_transpose": self.exif_transpose,
            "apply_rotation": self.apply_rotation,
            "max_pixels": self.max_pixels,
        }


# ---------------------------------------------------------------------------------------------
# Encode: CLIP image features through Hugging Face transformers, L2-normalised in float32
# ---------------------------------------------------------------------------------------------

OPENAI_MODELS = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
_CHECKPOINT_FILES = ["*.json", "*.txt", "*.safetensors"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where a model's files are, and what identifies its weights."""

    model_id: str  # a Hugging Face id, or the local directory
    revision: str  # the hub commit, or 'sha256:...' of a local directory's weight files
    path: Path


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(_sha256_of_file(path).encode())
    return "sha256:" + digest.hexdigest()


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The files of a hub model: from the local Hugging Face cache, or downloaded into it."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    download = functools.partial(huggingface_hub.snapshot_download, repo_id, revision=revision)
    pinned = f" at revision {revision!r}" if revision else ""
    try:
        folder = Path(download(allow_patterns=_CHECKPOINT_FILES))
        if not any(folder.glob("*.safetensors")):
            folder = Path(download(allow_patterns=["pytorch_model.bin"]))
    except RevisionNotFoundError:
        raise PipelineError(
            f"MODEL_REVISION={revision!r}: the model {repo_id!r} has no such branch, tag or commit on "
            "the Hugging Face hub. Use one listed on the model's page, or None for main."
        ) from None
    except RepositoryNotFoundError:
        raise PipelineError(
            f"MODEL={repo_id!r}: the Hugging Face hub has no such model (or it is private). Use an "
            f"OpenAI name ({', '.join(OPENAI_MODELS)}), a hub id, or a local directory."
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise PipelineError(
            f"Could not get the model {repo_id!r}{pinned}: the Hugging Face hub ({constants.ENDPOINT}) "
            f"could not be reached ({str(error).splitlines()[0]}) and the model is not in the local "
            f"cache ({constants.HF_HUB_CACHE}). To work offline, copy a cache that holds it (`hf "
            f"download {repo_id}{' --revision ' + revision if revision else ''}` where the hub is "
            "reachable) and point HF_HUB_CACHE at it, or set MODEL to a local directory holding "
            "config.json, preprocessor_config.json and model.safetensors."
        ) from None
    return folder


def resolve_checkpoint(model: str, revision: str | None = None) -> Checkpoint:
    """MODEL as an OpenAI name, a local directory or a Hugging Face id -> its files and identity.

    `revision` pins a hub model to a branch, tag or commit; the checkpoint records the commit.
    """
    local = resolve_path(model)
    if model not in OPENAI_MODELS and local.is_dir():
        if revision is not None:
            raise ParameterError(
                f"MODEL_REVISION={revision!r} applies to hub models, but MODEL={model!r} is a local "
                "directory (identified by its weights' digest). Set MODEL_REVISION=None."
            )
        return Checkpoint(str(local), _weights_digest(local), local)
    if model.startswith((".", "/", "~")):
        raise PipelineError(
            f"MODEL={model!r}: the directory {local} does not exist. Give a directory holding "
            f"config.json and model.safetensors, an OpenAI name ({', '.join(OPENAI_MODELS)}) or a hub id."
        )
    repo_id = OPENAI_MODELS.get(model, model)
    folder = _hub_snapshot(repo_id, revision)
    return Checkpoint(repo_id, folder.name, folder)


def resolve_device(device: str) -> torch.device:
    """DEVICE -> a torch device that exists on this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise ParameterError(
                f"DEVICE={device!r} is not available: torch {torch.__version__} sees {count} CUDA "
                "GPU(s) here. Use DEVICE='cpu' or 'auto'."
            )
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """PRECISION 'auto' is fp16 on CUDA (as OpenAI's own loader) and fp32 elsewhere."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def _checkpoint_preprocessing(folder: Path, image_size: int) -> Preprocessing:
    """Mean and std from the checkpoint's preprocessor_config.json (OpenAI's when absent)."""
    config = _read_json(folder / "preprocessor_config.json")
    mean = tuple(config.get("image_mean", OPENAI_MEAN))
    std = tuple(config.get("image_std", OPENAI_STD))
    return Preprocessing(image_size, mean, std)


def _normalised(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise in float32, whatever precision the model computed in."""
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True)


class PendingEmbeddings:
    """Embeddings queued on the device; `result()` waits for them (on the CPU they are ready)."""

    def __init__(self, parts: list[torch.Tensor], ready: torch.cuda.Event | None):
        self._parts = parts
        self._ready = ready

    def result(self) -> np.ndarray:
        """The (B, D) float32 embeddings, once the device has finished them."""
        if self._ready is not None:
            self._ready.synchronize()
        return np.concatenate([part.numpy() for part in self._parts])


class ClipEncoder:
    """A CLIP model on a device: preprocessed pixels in, L2-normalised float32 embeddings out."""

    def __init__(self, model: Any, checkpoint: Checkpoint, device: torch.device, precision: str):
        self.model = model
        self.checkpoint = checkpoint
        self.device = device
        self.precision = precision
        self.dtype = _DTYPES[precision]
        self.preprocessing = _checkpoint_preprocessing(checkpoint.path, model.config.vision_config.image_size)
        self.batch_limit: int | None = None  # set when the GPU ran out of memory on a bigger batch

    @property
    def embedding_size(self) -> int:
        return self.model.config.projection_dim

    @property
    def context_length(self) -> int:
        """Tokens the text model reads (77 for OpenAI's models); longer texts are truncated."""
        return self.model.config.text_config.max_position_embeddings

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The checkpoint's own tokenizer."""
        from transformers import AutoTokenizer

        folder = self.checkpoint.path
        # without these files transformers builds an empty tokenizer instead of failing
        if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
            raise self._no_tokenizer("it has no tokenizer files")
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as error:
            raise self._no_tokenizer(str(error).splitlines()[0]) from None

    def _no_tokenizer(self, problem: str) -> PipelineError:
        return PipelineError(
            f"The model {self.checkpoint.model_id} has no usable tokenizer in {self.checkpoint.path} "
            f"({problem}): text embeddings need its tokenizer files (tokenizer.json, or vocab.json "
            "and merges.txt)."
        )

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Embeddings (B, D) of preprocessed pixels (B, 3, n_px, n_px), normalised in float32."""
        return self.start_encoding(pixels).result()

    def start_encoding(self, pixels: np.ndarray) -> PendingEmbeddings:
        """Queue the embeddings of a non-empty batch; on CUDA this returns before the GPU is done.

        A CUDA out-of-memory error halves the batch, warns once, and goes on with the smaller size.
        """
        while True:
            step = min(len(pixels), self.batch_limit or len(pixels))
            try:
                parts = [self._launch(pixels[low : low + step]) for low in range(0, len(pixels), step)]
            except torch.cuda.OutOfMemoryError:
                self._halve_batch(step)
                continue
            ready = torch.cuda.Event() if self.device.type == "cuda" else None
            if ready is not None:
                ready.record(torch.cuda.current_stream(self.device))
            return PendingEmbeddings(parts, ready)

    def _launch(self, pixels: np.ndarray) -> torch.Tensor:
        """Queue a batch's copy to the device, its forward pass, and the copy of its embeddings back."""
        batch = torch.from_numpy(pixels)
        if self.device.type == "cuda":
            batch = batch.pin_memory()  # page-locked host memory: the copy below is asynchronous
        batch = batch.to(self.device, self.dtype, non_blocking=True)
        with torch.inference_mode():
            features = _normalised(self.model.get_image_features(pixel_values=batch).pooler_output)
        return features.to("cpu", non_blocking=True)  # into pinned memory from CUDA; ready at the event

    def _halve_batch(self, failed: int) -> None:
        if failed == 1:
            raise PipelineError(
                f"{self.device} ran out of memory on a single image with {self.checkpoint.model_id} in "
                f"{self.precision}: free the GPU (other processes, other notebooks' models) or use a "
                "smaller PRECISION such as 'fp16'."
            )
        if self.batch_limit is None:
            warnings.warn(
                f"{self.device} ran out of memory on a batch of {failed} images: going on with smaller "
                "batches. Lower GPU_BATCH_SIZE to avoid the retries.",
                stacklevel=3,
            )
        self.batch_limit = (failed + 1) // 2
        torch.cuda.empty_cache()

    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Embeddings (N, D) of texts, truncated to the context length, normalised in float32."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        vectors = [np.zeros((0, self.embedding_size), np.float32)]
        for low in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                texts[low : low + batch_size],
                padding=True,
                truncation=True,
                max_length=self.context_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                vectors.append(
                    _normalised(self.model.get_text_features(**tokens).pooler_output).cpu().numpy()
                )
        return np.concatenate(vectors)

    def signature(self) -> dict:
        """What must match for two runs' vectors to be mixed in one file."""
        return {
            "model_revision": self.checkpoint.revision,
            "embedding_size": self.embedding_size,
            **self.preprocessing.describe(),
            "precision": self.precision,
        }


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers in glibc's malloc.h


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse in this process; False where the C library is not glibc.

    A forward pass on the CPU allocates and frees activations of tens of MB. By default glibc maps
    each afresh and returns it to the kernel when freed, so every batch page-faults through hundreds
    of MB, about a tenth of ViT-B/32's time. Kept, the memory stays near its peak between batches.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, 1 << 30))


_HUB_COMMIT = re.compile(r"[0-9a-f]{40}")


def load_encoder(
    model: str, device: str = "auto", precision: str = "auto", revision: str | None = None
) -> ClipEncoder:
    """Load a CLIP checkpoint onto DEVICE in PRECISION (see resolve_checkpoint for MODEL forms)."""
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    with ThreadPoolExecutor(1, thread_name_prefix="checkpoint") as pool:
        # hashing a local checkpoint, or reading the hub, leaves a core free for the import
        located = pool.submit(resolve_checkpoint, model, revision)
        from transformers import CLIPModel

        checkpoint = located.result()
    model_type = _read_json(checkpoint.path / "config.json").get("model_type")
    if model_type != "clip":
        raise PipelineError(
            f"MODEL={model!r} ({checkpoint.path}) is not a CLIP checkpoint: its config.json says "
            f"model_type={model_type!r}. Use a CLIP model such as 'ViT-B/32'."
        )
    if not any(checkpoint.path.glob("*.safetensors")) and not any(checkpoint.path.glob("*.bin")):
        raise PipelineError(f"MODEL={model!r}: {checkpoint.path} holds no weights (*.safetensors or *.bin).")
    clip = CLIPModel.from_pretrained(checkpoint.path, dtype=torch.float32)
    clip = clip.to(torch_device, _DTYPES[precision]).eval()
    if torch_device.type == "cpu":
        keep_freed_memory()
    return ClipEncoder(clip, checkpoint, torch_device, precision)


# ---------------------------------------------------------------------------------------------
# Chunk files: one HDF5 file per row range, written atomically, described by its attributes
# ---------------------------------------------------------------------------------------------

_CHUNK_NAME = re.compile(r"chunk_(\d{9})_(\d{9})\.h5")
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
    "table_sha256",
)
_STRINGS = h5py.string_dtype("utf-8")


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
        return _signature(self.attrs)


def _attribute(value: Any) -> Any:
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
    group.create_dataset("urls", data=records.urls, dtype=_STRINGS, shape=(count,))
    group.create_dataset("image_ids", data=records.image_ids, dtype=_STRINGS, shape=(count,))
    group.create_dataset("rows", data=np.asarray(records.rows, dtype=np.int64))


def write_chunk(path: Path, result: ChunkResult, attrs: dict) -> None:
    """Write a chunk to a temporary name, then rename: a file with the final name is always whole."""
    embeddings = result.embeddings()
    embedded = result.embedded
    with _atomic_file(path) as temporary, open_hdf5(temporary, "w") as file:
        _write_records(file, embedded)
        file.create_dataset("embeddings", data=embeddings)
        failed = file.create_group("failed")
        _write_records(failed, result.failed)
        failed.create_dataset("reasons", data=result.reasons, dtype=_STRINGS, shape=(len(result.reasons),))
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
            attrs = {key: _attribute(value) for key, value in file.attrs.items()}
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
    return [read_chunk_info(path) for path in _chunk_paths(folder)]


def _chunk_paths(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("chunk_*.h5") if _CHUNK_NAME.fullmatch(path.name))


def _signature(attrs: dict) -> dict:
    """What chunks must share to be merged into one file, from their attributes."""
    return {key: attrs.get(key) for key in SIGNATURE_KEYS}


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
    "table_sha256": "the image table (01_metadata's DATASET, SPLIT, SOURCE, FETCH)",
}


def _describe_difference(first: dict, second: dict, labels: tuple[str, str]) -> str:
    """Each parameter that differs between two chunk attribute sets, with its value in each."""
    differing: dict[str, str] = {}
    for key in SIGNATURE_KEYS:
        if first.get(key) != second.get(key):
            differing.setdefault(_SIGNATURE_PARAMETERS[key], key)
    return "; ".join(
        f"{name}: {_shown(key, first)} {labels[0]}, {_shown(key, second)} {labels[1]}"
        for name, key in differing.items()
    )


def _shown(key: str, attrs: dict) -> str:
    """A signature value as a person recognises it: the model by its id, the table by its source."""
    value = attrs.get(key)
    if key == "table_sha256":
        source = json.loads(attrs.get("source") or "{}")
        return f"{source.get('dataset')} {source.get('source')!r} (sha256 {str(value)[:12]})"
    if _SIGNATURE_PARAMETERS[key].startswith("MODEL"):
        return f"{attrs.get('model_id')} ({key} {value!r})"
    return repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."


# ---------------------------------------------------------------------------------------------
# Locks: one writer per chunk and per merged file, across processes and machines sharing OUTPUT/
# ---------------------------------------------------------------------------------------------

_LOCKS_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def _flock(fd: int, operation: int, path: Path) -> bool:
    """flock(fd, operation); False when LOCK_NB finds it held. A filesystem without locks warns once."""
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno not in _LOCKS_UNSUPPORTED:
            raise
        warnings.warn(
            f"The filesystem of {path.parent} does not support file locks ({error.strerror}): two runs "
            "writing the same OUTPUT_DIR at once cannot be told apart. Give each run its own START and END.",
            stacklevel=3,
        )
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        found = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)


class FileLock:
    """An exclusive lock through a lock file that exists only while the lock is held.

    flock() locks belong to the open file, so the kernel drops them when their process dies, even
    by SIGKILL; the next process to lock the same path takes the stale file over.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; without `blocking`, return False at once when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not _flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB), self.path):
                    os.close(fd)
                    return False
                if _same_file(fd, self.path):  # else its holder removed it while we waited: again
                    os.ftruncate(fd, 0)
                    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}".encode())
                    self._fd = fd
                    return True
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (even if the removal is interrupted)."""
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


@contextlib.contextmanager
def _existing_lock_file(path: Path) -> Iterator[int | None]:
    """A descriptor of the lock file `path`, or None when there is no such file."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def lock_holder(path: Path) -> str | None:
    """Who holds the lock file `path` ("pid 12 on host, since ..."), or None when nobody does."""
    with _existing_lock_file(path) as fd:
        if fd is None or _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path):
            return None
        return os.pread(fd, 200, 0).decode(errors="replace") or "another process"


def _check_not_held_here(claim: str) -> None:
    """An error, not a wait that never ends, for a claim this very process holds: an interrupted cell's."""
    if f"pid {os.getpid()} on {socket.gethostname()} since" in claim:
        raise PipelineError(
            f"This kernel itself holds a claim on {claim.split(':')[0]}, left by a run that was "
            "interrupted: restart the kernel (which lets go of it), then run 02_embed again."
        )


def wait_for_lock(path: Path) -> None:
    """Return once nobody holds the lock file `path`."""
    with _existing_lock_file(path) as fd:
        if fd is not None:
            _flock(fd, fcntl.LOCK_SH, path)


def lock_path(path: Path) -> Path:
    """The lock file of an output file."""
    return path.with_name(path.name + ".lock")


def _chunks_lock(folder: Path) -> FileLock:
    """Held for a moment while a run claims a chunk or clears what interrupted runs left."""
    return FileLock(folder / ".lock")


def _ranges(folder: Path, suffix: str = "") -> dict[tuple[int, int], Path]:
    """Row ranges of the files in `folder` named chunk_<start>_<end>.h5 followed by `suffix`."""
    found = {}
    for path in folder.glob(f"chunk_*.h5{suffix}"):
        match = _CHUNK_NAME.fullmatch(path.name.removesuffix(suffix))
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = path
    return found


def _overlapping(ranges: Iterable[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    return [(low, high) for low, high in ranges if low < end and high > start]


def claim_chunk(folder: Path, start: int, end: int, rewrite: bool = False) -> FileLock | str | None:
    """The lock on rows [start, end) of the chunks in `folder` for this process, or why not.

    None: a finished chunk covers some of these rows (unless `rewrite`, for the chunk's own file).
    A string: who holds an overlapping claim, another run at work on these rows.
    """
    with _chunks_lock(folder):
        finished = set(_ranges(folder)) - ({(start, end)} if rewrite else set())
        if _overlapping(finished, start, end):
            return None
        claims = _ranges(folder, ".lock")
        for low, high in _overlapping(claims, start, end):
            holder = lock_holder(claims[(low, high)])
            if holder:
                return f"rows [{low}, {high}): {holder}"
        claim = FileLock(lock_path(chunk_path(folder, start, end)))
        if not claim.acquire(blocking=False):  # a process that locks chunks without claiming them
            return f"rows [{start}, {end}): {lock_holder(claim.path)}"
        try:
            temporary_path(chunk_path(folder, start, end)).unlink(missing_ok=True)
        except BaseException:
            claim.release()
            raise
        return claim


@contextlib.contextmanager
def claimed(folder: Path, start: int, end: int, rewrite: bool = False) -> Iterator[FileLock | str | None]:
    """claim_chunk for the duration of a block: the lock it takes is released however the block ends.

    An interrupt (a notebook's stop button) anywhere in between leaves no claim behind, so a later
    run in the same kernel does not wait on a claim of its own.
    """
    claim = None
    try:
        claim = claim_chunk(folder, start, end, rewrite)
        yield claim
    finally:
        if isinstance(claim, FileLock):
            claim.release()


def wait_for_claims(folder: Path, start: int, end: int) -> None:
    """Return once no other run holds a claim on any of rows [start, end)."""
    claims = _ranges(folder, ".lock")
    for found in _overlapping(claims, start, end):
        wait_for_lock(claims[found])


def remove_stale_files(folder: Path) -> list[str]:
    """Delete what interrupted runs left in a chunk folder: lock and temporary files nobody holds."""
    removed = []
    with _chunks_lock(folder):
        for claim in _ranges(folder, ".lock").values():
            if lock_holder(claim) is None:
                claim.unlink()
                removed.append(claim.name)
        for temporary in _ranges(folder, ".tmp").values():
            if not lock_path(temporary.with_suffix("")).exists():
                temporary.unlink()
                removed.append(temporary.name)
    return removed


# ---------------------------------------------------------------------------------------------
# Embed: rows [START, END) in chunks; per chunk fetch -> decode -> preprocess -> encode -> write
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """Which row ranges a run finds done in a collection's chunk folder, and which it still has to embed."""

    folder: Path
    start: int
    end: int
    done: list[ChunkInfo]
    todo: list[tuple[int, int]]
    retry: list[ChunkInfo] = dataclasses.field(default_factory=list)  # done, with failed rows to retry
    signature: dict = dataclasses.field(default_factory=dict)  # what every chunk of the output shares

    @property
    def rows_to_do(self) -> int:
        """Rows to embed, and failed rows to attempt again."""
        return _row_count(self.todo) + sum(info.failed for info in self.retry)

    def __str__(self) -> str:
        text = (
            f"rows [{self.start}, {self.end}): {len(self.done)} chunk(s) already done, "
            f"{len(self.todo)} to embed ({_row_count(self.todo):,} rows)"
        )
        if self.retry:
            failed = sum(info.failed for info in self.retry)
            text += f", {len(self.retry)} to retry ({failed:,} failed rows)"
        return text


def run_encoder(params: EmbedParams, collection: Collection) -> ClipEncoder:
    """02's encoder: MODEL on DEVICE in PRECISION, at the revision the collection's chunks record.

    With MODEL_REVISION=None, a collection whose chunks record a hub commit continues with that
    commit, even after the hub's main has moved on. PRECISION='auto' that resolves to another
    precision than the chunks record (another device) is an error naming the value that continues.
    """
    first = _chunk_paths(collection.chunks)[:1]
    recorded = read_chunk_info(first[0]).attrs if first else {}
    revision = params.model_revision or _recorded_commit(recorded, params.model)
    if revision and params.model_revision is None:
        print(f"MODEL_REVISION=None: continuing with revision {revision}, which {collection.chunks} records")
    device = resolve_device(params.device)
    precision = resolve_precision(params.precision, device)
    if recorded and params.precision == "auto" and precision != recorded.get("precision"):
        raise PipelineError(
            f"PRECISION='auto' is {precision!r} on {device}, but the chunks in {collection.chunks} were "
            f"made in {recorded.get('precision')!r} (on {recorded.get('device')}): set "
            f"PRECISION={recorded.get('precision')!r} to continue this collection here, or give this run "
            "another OUTPUT_DIR."
        )
    return load_encoder(params.model, params.device, params.precision, revision)


def _recorded_commit(recorded: dict, model: str) -> str | None:
    """The hub commit that a file made by MODEL records (a chunk's or a merged file's attributes), if any."""
    recorded_model = recorded.get("model")
    same_model = OPENAI_MODELS.get(recorded_model, recorded_model) == OPENAI_MODELS.get(model, model)
    revision = str(recorded.get("model_revision"))
    return revision if same_model and _HUB_COMMIT.fullmatch(revision) else None


CPU_BATCH_SIZE = 32  # the fastest batch on CPUs in the benchmarks' sweep (benchmarks/RESULTS.md)
CUDA_BATCH_LIMIT = 1024


def with_machine_sizes(params: EmbedParams, encoder: ClipEncoder) -> EmbedParams:
    """The parameters with GPU_BATCH_SIZE and NUM_WORKERS 'auto' resolved for this machine.

    NUM_WORKERS: one decoding thread per CPU core this process may use. GPU_BATCH_SIZE: on the
    CPU, the benchmarks' best; on CUDA, the largest power of two (up to 1024) whose forward pass
    fits in half the GPU's free memory, measured with a small batch.
    """
    workers = params.num_workers if params.num_workers != "auto" else cpu_cores()
    batch = params.gpu_batch_size
    if batch == "auto":
        batch = CPU_BATCH_SIZE if encoder.device.type == "cpu" else cuda_batch_size(encoder)
    return dataclasses.replace(params, gpu_batch_size=batch, num_workers=workers)


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, which containers and schedulers set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cuda_batch_size(encoder: ClipEncoder, probe: int = 16) -> int:
    """The largest power of two up to CUDA_BATCH_LIMIT whose forward pass fits in half the free memory."""
    size = encoder.preprocessing.image_size
    torch.cuda.synchronize(encoder.device)
    torch.cuda.reset_peak_memory_stats(encoder.device)
    before = torch.cuda.memory_allocated(encoder.device)
    encoder.encode(np.zeros((probe, 3, size, size), np.float32))
    per_image = (torch.cuda.max_memory_allocated(encoder.device) - before) / probe
    free, _ = torch.cuda.mem_get_info(encoder.device)
    return batch_for_memory(free // 2, per_image, CUDA_BATCH_LIMIT)


def batch_for_memory(budget: float, per_image: float, limit: int) -> int:
    """The largest power of two, from 1 to `limit`, of images that fit in `budget` bytes."""
    fits = max(1, min(limit, int(budget // max(per_image, 1.0))))
    return 1 << (fits.bit_length() - 1)


def image_recipe(encoder: ClipEncoder, params: EmbedParams) -> ImageRecipe:
    """The encoder's preprocessing with the run's orientation options and pixel limit."""
    return ImageRecipe(
        encoder.preprocessing,
        params.max_pixels,
        params.exif_transpose,
        params.apply_rotation,
        params.preprocess,
    )


def run_attributes(encoder: ClipEncoder, recipe: ImageRecipe, table: ImageTable) -> dict:
    """How this run makes its vectors, as each chunk file records it."""
    return {
        **encoder.signature(),
        **recipe.describe(),
        "table_sha256": table.info["sha256"],
        "model_id": encoder.checkpoint.model_id,
        "device": encoder.device.type,
        "library_versions": json.dumps(library_versions()),
    }


def run_signature(encoder: ClipEncoder, recipe: ImageRecipe, table: ImageTable) -> dict:
    """What every chunk of one output shares, with the model's id and the table's source to name them.

    Shared: the model, preprocessing, orientation options, precision and image table.
    """
    attributes = run_attributes(encoder, recipe, table)
    return {**_signature(attributes), "model_id": attributes["model_id"], "source": json.dumps(table.info)}


def _split_range(start: int, end: int, size: int) -> list[tuple[int, int]]:
    return [(low, min(low + size, end)) for low in range(start, end, size)]


def _row_count(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(end - start for start, end in ranges)


def _check_row_range(start: int, end: int | None, rows: int) -> int:
    end = rows if end is None else end
    if start >= rows or end > rows:
        raise ParameterError(
            f"START={start}, END={end} is outside the image table, which has {rows:,} rows: "
            f"use 0 <= START < END <= {rows}, or END=None for the end of the table."
        )
    return end


def _check_signatures(chunks: list[ChunkInfo], signature: dict) -> None:
    for info in chunks:
        if info.signature != _signature(signature):
            raise PipelineError(
                f"{info.path} was made differently from this run "
                f"({_describe_difference(info.attrs, signature, ('recorded', 'requested'))}). Run with the "
                "recorded values to continue this collection, or give this run another OUTPUT_DIR (a "
                "collection of its own)."
            )


def _uncovered(start: int, end: int, chunk: int, done: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Rows of [start, end) outside the `done` ranges, in pieces of at most `chunk` rows."""
    todo, cursor = [], start
    for low, high in sorted(done):
        if low > cursor:
            todo += _split_range(cursor, min(low, end), chunk)
        cursor = max(cursor, high)
    if cursor < end:
        todo += _split_range(cursor, end, chunk)
    return todo


def plan_chunks(
    collection: Collection,
    start: int,
    end: int | None,
    chunk: int,
    signature: dict,
    rows: int,
    retry_failed: bool = False,
) -> ChunkPlan:
    """Cover rows [start, end) with chunks of at most `chunk` rows, skipping rows already embedded.

    A chunk file made with another model, preprocessing, precision or image table is never
    reused: it is an error that says what differs. With `retry_failed`, finished chunks that
    recorded failures are planned for a retry of those rows.
    """
    end = _check_row_range(start, end, rows)
    existing = find_chunks(collection.chunks)
    if not existing:
        _check_no_earlier_chunks(collection, signature["table_sha256"])
    _check_signatures(existing, signature)
    done = [info for info in existing if info.start < end and info.end > start]
    todo = _uncovered(start, end, chunk, [(info.start, info.end) for info in done])
    retry = [info for info in done if info.failed] if retry_failed else []
    return ChunkPlan(collection.chunks, start, end, done, todo, retry, signature)


def _check_no_earlier_chunks(collection: Collection, table_sha256: str) -> None:
    """Say so when OUTPUT/chunks holds chunks of this table, which a new collection would embed again.

    Versions without OUTPUT_DIR kept every collection's chunks in OUTPUT/chunks and the table in
    .cache/: while that table is there, such chunks are this collection's own, and 02 stops with
    the move that continues them. Once OUTPUT/ has a table of its own, they may be its collection's
    (the demo's, say), and 02 only notes them.
    """
    shared = Collection(resolve_path(DEFAULT_OUTPUT_DIR))
    if collection == shared:
        return
    try:
        theirs = [info for info in find_chunks(shared.chunks) if info.attrs["table_sha256"] == table_sha256]
    except PipelineError:  # unreadable chunks there: not this run's to judge
        return
    if not theirs:
        return
    move = f"mkdir -p {collection.chunks} && mv {shared.chunks}/chunk_*.h5 {collection.chunks}/"
    if WORKSPACE.earlier_table.is_file():
        raise PipelineError(
            f"{shared.chunks} holds {len(theirs)} chunk file(s) of this image table, made by an earlier "
            f"version that kept every collection in {shared.folder}. To continue them in this collection, "
            f"move them here first: {move}. To leave them to the collection in {shared.folder} and start "
            f"this one afresh, first run 01_metadata with OUTPUT_DIR={DEFAULT_OUTPUT_DIR!r}: that moves "
            "their image table there from .cache/."
        )
    print(
        f"Note: {shared.chunks} holds {len(theirs)} chunk file(s) of this same image table, the collection "
        f"in {shared.folder}'s (or made there by an earlier version). To reuse them rather than embed their "
        f"rows again, stop now and move them here: {move}"
    )


@dataclasses.dataclass
class Loaded:
    """One image after fetch and preprocessing: its pixels, or the reason it failed."""

    pixels: np.ndarray | None
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
    for batch in _batches(enumerate(loaded), batch_size):
        pixels = [item.pixels for _, item in batch if item.pixels is not None]
        queued = (batch, encoder.start_encoding(np.stack(pixels)) if pixels else None)
        if on_device:
            finish(*on_device)
        on_device = queued
    if on_device:
        finish(*on_device)
    result.seconds += time.perf_counter() - began


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


@dataclasses.dataclass
class RunSummary:
    """What one 02 run did."""

    chunks_skipped: int
    chunks_written: int = 0
    attempted: int = 0
    embedded: int = 0
    failed_by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    chunks_retried: int = 0
    retried: int = 0
    recovered: int = 0
    seconds: float = 0.0

    def add(self, stats: dict) -> None:
        self.chunks_written += 1
        self.attempted += stats["attempted"]
        self.embedded += stats["embedded"]
        self.failed_by_reason.update(stats["failed_by_reason"])

    def add_retry(self, before: ChunkInfo, after: ChunkResult) -> None:
        self.chunks_retried += 1
        self.retried += after.retried
        self.recovered += before.failed - len(after.failed.rows)

    def __str__(self) -> str:
        attempted = self.attempted + self.retried
        rate = attempted / self.seconds if self.seconds else 0.0
        failed = sum(self.failed_by_reason.values())
        lines = [
            f"chunks written: {self.chunks_written}, already done: {self.chunks_skipped}",
            f"images attempted: {self.attempted:,}, embedded: {self.embedded:,}, failed: {failed:,}"
            f" ({rate:,.1f} img/s)",
        ]
        lines += [f"  failed, {reason}: {count:,}" for reason, count in self.failed_by_reason.most_common()]
        if self.chunks_retried:
            lines.append(
                f"failed images retried: {self.retried:,} in {self.chunks_retried} chunk(s), "
                f"recovered: {self.recovered:,}, still failed: {self.retried - self.recovered:,}"
            )
        return "\n".join(lines)


def library_versions() -> dict:
    """Versions of what shapes the vectors, recorded in every file."""
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "h5py": h5py.__version__,
    }


# A headless run prints a line at least every PROGRESS_INTERVAL seconds and at most one every
# LINE_GAP seconds, besides its first and last: a line per chunk, chunks written closer together
# counted in one line.
PROGRESS_INTERVAL = 30.0
LINE_GAP = 10.0


class RunProgress:
    """How far one 02 run is: a tqdm bar where someone watches it, else a printed line now and then.

    A line gives the rows done of the run's total, img/s, the failures so far with the commonest
    reason, and the time left. One is printed for the chunks written (one line per chunk, or per
    `gap` seconds when they come faster), and one every `interval` seconds in between, also while
    no image arrives: a stalled source shows as a count that stops moving.
    """

    def __init__(
        self,
        total: int,
        lines: bool | None = None,
        interval: float = PROGRESS_INTERVAL,
        gap: float = LINE_GAP,
    ):
        self.total = total
        self.done = 0  # rows this run embedded or recorded as failed
        self.elsewhere = 0  # rows of the plan that another run did
        self.failed: collections.Counter = collections.Counter()
        self._lines = not watched() if lines is None else lines
        self._interval, self._gap = interval, gap
        self._began = self._last_line = time.monotonic()
        self._printed = 0
        self._written: list[str] = []  # chunks written since the last line
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._ticker = threading.Thread(target=self._print_every_interval, name="progress", daemon=True)
        self._bar = tqdm(total=total, desc="embed", unit="img", disable=self._lines or not total)

    def __enter__(self) -> RunProgress:
        if self._lines and self.total:
            self._ticker.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stopped.set()
        if self._ticker.is_alive():
            self._ticker.join()
        if self._written:
            self._print()
        self._bar.close()

    def add(self, reasons: Sequence[str | None]) -> None:
        """Count a batch of rows: None for each embedded one, else the reason it failed."""
        with self._lock:
            self.done += len(reasons)
            self.failed.update(reason for reason in reasons if reason is not None)
            failed = self.failed.total()
        self._bar.set_postfix(failed=failed, refresh=False)
        self._bar.update(len(reasons))

    def add_elsewhere(self, rows: int) -> None:
        """Count rows of the plan that another run embedded."""
        with self._lock:
            self.elsewhere += rows
        self._bar.update(rows)

    def chunk_written(self, name: str) -> None:
        """Say that a chunk file is written: now, or in the next line when the last one is recent."""
        if not self._lines:
            return
        with self._lock:
            self._written.append(name)
            due = not self._printed or time.monotonic() - self._last_line >= self._gap
        if due:
            self._print()

    def line(self) -> str:
        """Rows done of the total, img/s, failures with the commonest reason, and the time left."""
        with self._lock:
            done, settled, failed = self.done, self.done + self.elsewhere, self.failed.most_common(1)
            failures = self.failed.total()
        rate = done / max(time.monotonic() - self._began, 1e-9)
        share = f" ({settled / self.total:.1%})" if self.total else ""
        text = f"{settled:,} of {self.total:,} rows{share}, {rate:,.1f} img/s, {failures:,} failed"
        if failed:
            text += f" (most: {failed[0][0]}, {failed[0][1]:,})"
        left = self.total - settled
        return text + (f", about {_duration(left / rate)} left" if rate and left else "")

    def _print(self) -> None:
        with self._lock:
            written, self._written = self._written, []
            self._last_line = time.monotonic()
            self._printed += 1
        print(f"[02] {_chunks_written(written)}{self.line()}", flush=True)

    def _print_every_interval(self) -> None:
        while not self._stopped.wait(max(0.0, self._last_line + self._interval - time.monotonic())):
            if time.monotonic() - self._last_line >= self._interval:
                self._print()


def _chunks_written(names: list[str]) -> str:
    """The start of a progress line that reports chunk files written since the last one."""
    if len(names) > 1:
        return f"{len(names)} chunks written, the last {names[-1]}; "
    return f"{names[0]} written; " if names else ""


def _duration(seconds: float) -> str:
    """12s, 5m 41s, 3h 07m."""
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def embed_chunks(
    table: ImageTable, encoder: ClipEncoder, recipe: ImageRecipe, plan: ChunkPlan, params: EmbedParams
) -> RunSummary:
    """Embed every chunk the plan has to do, writing each chunk file as soon as it is complete.

    Each chunk is claimed first (a lock file beside it), so runs that share OUTPUT_DIR never write
    the same rows: a chunk claimed by another run is left to it, and waited for at the end.
    """
    check_writable(plan.folder)
    params = with_machine_sizes(params, encoder)
    needed = estimated_bytes(table, plan.todo, encoder.embedding_size)
    check_free_space(plan.folder, needed, f"{_row_count(plan.todo):,} rows of chunk files")
    removed = remove_stale_files(plan.folder)
    if removed:
        print(f"Removed {len(removed)} file(s) that an interrupted run left in {plan.folder}")
    attrs = {
        **run_attributes(encoder, recipe, table),
        "format_version": FORMAT_VERSION,
        "model": params.model,
        "source": json.dumps(table.info),
    }
    fetch_threads = FETCH_THREADS_PER_WORKER * params.num_workers
    fetcher = Fetcher(params.s3_endpoint_url, pool_size=fetch_threads)
    lookahead = 2 * params.gpu_batch_size + fetch_threads
    began = time.perf_counter()
    with (
        ImageLoader(fetcher, recipe, params.num_workers, lookahead) as loader,
        RunProgress(plan.rows_to_do) as progress,
    ):
        reach = SourceCheck(enabled=params.stop_if_unreachable)
        run = _ChunkWriter(
            plan.folder,
            table,
            encoder,
            loader,
            params.gpu_batch_size,
            attrs,
            progress,
            reach,
            RunSummary(len(plan.done)),
        )
        todo = plan.todo
        while todo:
            busy = [piece for start, end in todo for piece in run.embed(start, end)]
            busy += run.write_unproven()
            todo = _after_other_runs(busy, plan, params.chunk, progress)
        for info in plan.retry:
            run.retry(info)
    run.summary.seconds = time.perf_counter() - began
    return run.summary


UNREACHABLE_REASONS = ("connection error", "timeout", "cannot resolve", "s3 AccessDenied", "s3 NoSuchBucket")
UNREACHABLE_AFTER = 200  # failed attempts, all for want of a way to the images, that stop a run
_UNREACHABLE_ADVICE = {
    "connection error": "nothing answers there: check the network, a proxy (HTTPS_PROXY), S3_ENDPOINT_URL "
    "and the table's locations",
    "timeout": "the server does not answer in time: check the network, a firewall or a proxy",
    "cannot resolve": "its host name cannot be resolved: is this machine offline? Check DNS and the "
    "table's locations",
    "s3 AccessDenied": "the bucket refuses requests without credentials, which 02 does not send: use a "
    "public bucket (as Open Images' is) or a copy of the images",
    "s3 NoSuchBucket": "there is no such bucket at this endpoint: check the bucket in the table's "
    "locations and S3_ENDPOINT_URL",
}


class SourceCheck:
    """Whether a run reaches its images: first attempts that all fail for want of a way there stop it.

    A run whose first UNREACHABLE_AFTER attempts all failed with a connection-level reason stops
    with what to check, instead of recording millions of failures as finished chunks. One image
    that arrives, or fails for another reason, proves the way. RETRY_FAILED's attempts are left
    out: their rows failed before, and a retry that fails again records nothing new.
    """

    def __init__(self, enabled: bool = True, limit: int = UNREACHABLE_AFTER):
        self.proven = not enabled
        self._limit = limit
        self._reasons: collections.Counter = collections.Counter()
        self._example: str | None = None

    def add(self, locations: list[str], reasons: list[str | None]) -> None:
        """Count a batch's attempts; raise PipelineError once the limit is reached unproven."""
        if self.proven:
            return
        for location, reason in zip(locations, reasons, strict=True):
            if reason not in UNREACHABLE_REASONS:
                self.proven = True
                return
            self._reasons[reason] += 1
            self._example = self._example or location
        if self._reasons.total() >= self._limit:
            reason, _ = self._reasons.most_common(1)[0]
            failed = f"{self._reasons.total()} images of this run all failed ({_counted(self._reasons)})"
            raise PipelineError(
                f"The first {failed}, e.g. {self._example} ({reason}): {_UNREACHABLE_ADVICE[reason]}. "
                "02 stopped and recorded none of them, so a run that can reach them embeds them all; set "
                "STOP_IF_UNREACHABLE=False to record such failures anyway."
            )


def _counted(counter: collections.Counter) -> str:
    return ", ".join(f"{reason}: {count:,}" for reason, count in counter.most_common())


@dataclasses.dataclass
class _ChunkWriter:
    """Claims, embeds and writes one run's chunks, and keeps its summary.

    Until the run proves it reaches its images (SourceCheck), finished chunks wait in memory, without
    their claims, so that a run that stops for want of a way to them records nothing.
    """

    folder: Path
    table: ImageTable
    encoder: ClipEncoder
    loader: ImageLoader
    batch_size: int
    attrs: dict
    progress: RunProgress
    reach: SourceCheck
    summary: RunSummary
    unproven: list[ChunkResult] = dataclasses.field(default_factory=list)

    def embed(self, start: int, end: int) -> list[tuple[int, int]]:
        """Embed rows [start, end) into chunk files; return the ranges another run is at work on.

        Rows that another run finished meanwhile are skipped, and the rest of the range is embedded.
        """
        with claimed(self.folder, start, end) as claim:
            if isinstance(claim, str):
                _check_not_held_here(claim)
                print(f"rows [{start}, {end}) overlap a chunk that another run is embedding ({claim})")
                return [(start, end)]
            if claim is None:
                return self._embed_rest(start, end)
            result = embed_chunk(
                self.table, start, end, self.encoder, self.loader, self.batch_size, self._observe
            )
            if self.reach.proven:
                self._write(result)
        if not self.reach.proven:
            self.unproven.append(result)
            return []
        return self.write_unproven()

    def write_unproven(self) -> list[tuple[int, int]]:
        """Write the chunks that waited, each under a claim again; return the ranges other runs hold.

        This happens once the run proves it reaches its images, or at the end of its chunks, short
        of the limit. A chunk whose rows another run finished meanwhile is dropped; one whose rows
        another run is at work on is waited for like any busy range.
        """
        busy = []
        while self.unproven:
            result = self.unproven.pop(0)
            with claimed(self.folder, result.start, result.end) as claim:
                if isinstance(claim, FileLock):
                    self._write(result)
                elif isinstance(claim, str):
                    busy.append((result.start, result.end))
        return busy

    def _write(self, result: ChunkResult) -> None:
        path = chunk_path(self.folder, result.start, result.end)
        write_chunk(path, result, self.attrs)
        self.summary.add(result.stats())
        self.progress.chunk_written(path.name)

    def _observe(self, locations: list[str], reasons: list[str | None]) -> None:
        self.progress.add(reasons)
        self.reach.add(locations, reasons)

    def _count_retried(self, locations: list[str], reasons: list[str | None]) -> None:
        self.progress.add(reasons)

    def _embed_rest(self, start: int, end: int) -> list[tuple[int, int]]:
        """Embed the rows of [start, end) that no finished chunk covers; return the busy ranges."""
        finished = _overlapping(_ranges(self.folder), start, end)
        rest = _uncovered(start, end, end - start, finished)
        self.progress.add_elsewhere(end - start - _row_count(rest))
        if not rest:
            self.summary.chunks_skipped += 1
        return [busy for low, high in rest for busy in self.embed(low, high)]

    def retry(self, info: ChunkInfo) -> None:
        """Attempt a finished chunk's failed rows again and replace the chunk file whole.

        A retry loses nothing when it fails again, so it is written at once and not judged by the
        reachability check.
        """
        with claimed(self.folder, info.start, info.end, rewrite=True) as claim:
            if not isinstance(claim, FileLock):
                print(f"{info.path.name} is not retried: another run is at work on its rows ({claim})")
                return
            current = read_chunk_info(info.path)  # as it is now, under the claim
            result = retry_chunk(
                current, self.table, self.encoder, self.loader, self.batch_size, self._count_retried
            )
            write_chunk(info.path, result, current.attrs)
        self.summary.add_retry(current, result)
        self.progress.chunk_written(info.path.name)


def _after_other_runs(
    busy: list[tuple[int, int]], plan: ChunkPlan, chunk: int, progress: RunProgress
) -> list[tuple[int, int]]:
    """Wait for the runs at work on the `busy` ranges; what they left undone is this run's to do."""
    if not busy:
        return []
    print(f"Waiting for the other run(s) to finish {len(busy)} chunk(s)...")
    for start, end in busy:
        wait_for_claims(plan.folder, start, end)
    finished = find_chunks(plan.folder)
    _check_signatures(finished, plan.signature)
    done = [(info.start, info.end) for info in finished]
    left = [piece for start, end in busy for piece in _uncovered(start, end, chunk, done)]
    progress.add_elsewhere(_row_count(busy) - _row_count(left))
    return left


# ---------------------------------------------------------------------------------------------
# Merge: chunk files -> one verified file, streamed in row order with bounded memory
# ---------------------------------------------------------------------------------------------

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
                f"({_describe_difference(first.attrs, info.attrs, (first.path.name, info.path.name))}): "
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
    norms = np.linalg.norm(source["embeddings"][:], axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (np.abs(norms - 1) > NORM_TOLERANCE))
    if len(bad):
        raise PipelineError(
            f"{info.path}: {len(bad)} embedding(s) are not of unit length (e.g. row "
            f"{rows[bad[0]]}, norm {norms[bad[0]]}). Delete the file and run 02_embed for its rows."
        )


def _create_merged_datasets(file: h5py.File, embedded: int, failed: int, dimension: int) -> None:
    file.create_dataset("embeddings", shape=(embedded, dimension), dtype=np.float32)
    for group, count in ((file, embedded), (file.create_group("failed"), failed)):
        group.create_dataset("urls", shape=(count,), dtype=_STRINGS)
        group.create_dataset("image_ids", shape=(count,), dtype=_STRINGS)
        group.create_dataset("rows", shape=(count,), dtype=np.int64)
    file["failed"].create_dataset("reasons", shape=(failed,), dtype=_STRINGS)


def _copy_records(source: h5py.Group, target: h5py.Group, names: Sequence[str], offset: int) -> None:
    count = len(source["rows"])
    for name in names:
        target[name][offset : offset + count] = source[name][:]


def _verify_merged(path: Path, chunks: list[ChunkInfo]) -> None:
    """Re-read the merged file: each chunk's segment must reproduce the digest that chunk recorded."""
    with open_hdf5(path) as file:
        offset = 0
        for info in chunks:
            segment = slice(offset, offset + info.embedded)
            digest = records_digest(
                file["rows"][segment],
                file["embeddings"][segment],
                file["image_ids"][segment],
                file["urls"][segment],
            )
            if digest != info.attrs["digest"]:
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


def _merged_attrs(chunks: list[ChunkInfo], report: MergeReport) -> dict:
    first = chunks[0]
    return {
        **{key: first.attrs[key] for key in SIGNATURE_KEYS},
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
        attrs = {key: _attribute(value) for key, value in file.attrs.items()}
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
    with _atomic_file(path) as temporary:
        with open_hdf5(temporary, "w") as target:
            _create_merged_datasets(target, attrs["embedded"], attrs["failed"], int(attrs["embedding_size"]))
            offset = failed_offset = 0
            for info in progress_bar(chunks, desc="merge", unit="chunk"):
                with open_hdf5(info.path) as source:
                    _check_chunk_records(source, info, int(attrs["embedding_size"]))
                    _copy_records(source, target, ("rows", "image_ids", "urls", "embeddings"), offset)
                    failed_names = ("rows", "image_ids", "urls", "reasons")
                    _copy_records(source["failed"], target["failed"], failed_names, failed_offset)
                offset += info.embedded
                failed_offset += info.failed
            target.attrs.update(attrs)
        _verify_merged(temporary, chunks)


def merge_chunks(
    collection: Collection, output_file: str | None = None, cleanup: bool = False
) -> MergeReport:
    """Merge every chunk of the collection into OUTPUT_FILE, verified before it replaces anything.

    OUTPUT_FILE None is the collection's Images_Embedded.h5. Memory is bounded by one chunk,
    whatever the number of chunks. Overlapping chunks or chunks of different models are errors;
    rows that no chunk covers are reported as gaps. With `cleanup`, the chunk files are deleted
    once the merged file is verified. One merge at a time writes a given OUTPUT_FILE (a lock file
    beside it); a killed merge leaves the old file whole.
    """
    path = resolve_path(output_file) if output_file else collection.merged_file
    check_writable(path.parent)
    with _merge_lock(path):
        temporary_path(path).unlink(missing_ok=True)  # left by an interrupted merge
        chunks = find_chunks(collection.chunks)
        if _holds_every_chunk(path, collection.chunks, chunks):
            report = _report_of_merged(path)
        elif chunks:
            report = _merge(path, chunks)
        else:
            raise PipelineError(f"There are no chunk files in {collection.chunks}: run 02_embed first.")
        if cleanup:
            report = dataclasses.replace(report, kept=_delete_merged_chunks(path, collection.chunks, chunks))
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


def _merge(path: Path, chunks: list[ChunkInfo]) -> MergeReport:
    """Write the merged file of `chunks` at `path`."""
    _check_chunks_agree(chunks)
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
    _write_merged(path, chunks, _merged_attrs(chunks, report))
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


# ---------------------------------------------------------------------------------------------
# Search (04_search): exact top-k streamed from HDF5, an approximate FAISS index, a gallery, exports
# ---------------------------------------------------------------------------------------------

SEARCH_BLOCK_BYTES = 256 << 20  # embeddings read per block: memory stays bounded whatever N is
THUMBNAIL_SIZE = 160


@dataclasses.dataclass(frozen=True)
class EmbeddingsFile:
    """A merged file as 04 reads it: its path, size and how its vectors were made."""

    path: Path
    count: int
    dimension: int
    attrs: dict

    @property
    def folder(self) -> Path:
        """The file's folder, its collection's: the one that keeps its image table, index and exports."""
        return self.path.parent

    def derived(self, suffix: str) -> Path:
        """A file made from this one, beside it: its index or an export, <stem><suffix>."""
        return self.folder / (self.path.stem + suffix)

    @property
    def block_rows(self) -> int:
        return max(1, SEARCH_BLOCK_BYTES // (4 * self.dimension))

    def blocks(self, reuse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, embeddings) of consecutive blocks of the file, read one at a time.

        With `reuse`, every block is read into the same buffer (fresh memory per block costs more
        than the read, for a search): the caller uses each block before asking for the next.
        """
        shared = np.empty((min(self.block_rows, self.count), self.dimension), np.float32) if reuse else None
        with open_hdf5(self.path) as file:
            for start in range(0, self.count, self.block_rows):
                rows = min(self.block_rows, self.count - start)
                buffer = shared if reuse else np.empty((rows, self.dimension), np.float32)
                file["embeddings"].read_direct(buffer, np.s_[start : start + rows], np.s_[:rows])
                yield start, buffer[:rows]

    def records(self, positions: np.ndarray) -> dict[str, list]:
        """image_id, url and row of the given positions, in that order."""
        order = np.argsort(positions)
        unique, inverse = np.unique(positions[order], return_inverse=True)
        with open_hdf5(self.path) as file:
            columns = {
                "image_id": file["image_ids"].asstr()[unique],
                "url": file["urls"].asstr()[unique],
                "row": file["rows"][unique],
            }
        back = np.empty(len(positions), dtype=np.int64)
        back[order] = inverse
        return {name: values[back].tolist() for name, values in columns.items()}

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
        with open_hdf5(self.path) as file:
            return file["embeddings"][position]

    def locations(self, rows: Sequence[int], urls: Sequence[str]) -> list[str]:
        """Where 02 fetched the images of these rows, for thumbnails.

        That is the image table's `location` (an S3 key for Open Images with FETCH='s3', a relative
        path resolved as 01 resolved it) when the collection holds the table the file was made
        from; without it, the urls, relative paths taken from the repository root.
        """
        table = Collection(self.folder).table
        if not self._made_from(table):
            return _resolve_locations(pd.Series(list(urls), dtype=str), str(WORKSPACE.root)).tolist()
        return table_values(table, "location", rows)

    def _made_from(self, table: Path) -> bool:
        """Whether the image table at `table` is the one the file was made from (the same digest)."""
        info = _table_info(table)
        return bool(info) and info["sha256"] == json.loads(self.attrs.get("source", "{}")).get("sha256")


def array_blocks(vectors: Any, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of consecutive blocks of an array or HDF5 dataset, read one at a time."""
    for start in range(0, len(vectors), block_rows):
        yield start, vectors[start : start + block_rows]


def open_embeddings(collection: Collection, path: str | os.PathLike | None = None) -> EmbeddingsFile:
    """The merged file at `path` (None: the collection's); a missing or foreign file is an error."""
    resolved = resolve_path(path) if path else collection.merged_file
    if not resolved.is_file():
        raise PipelineError(
            f"EMBEDDINGS file {resolved} does not exist: run 03_merge first, or fix the path."
        )
    try:
        with open_hdf5(resolved) as file:
            count, dimension = file["embeddings"].shape
            attrs = {key: _attribute(value) for key, value in file.attrs.items()}
            for name in ("image_ids", "urls", "rows"):
                if len(file[name]) != count:
                    raise KeyError(f"{name} and embeddings differ in length")
    except (OSError, KeyError, ValueError) as error:
        raise PipelineError(
            f"{resolved} is not a merged embeddings file ({error}): give EMBEDDINGS the file 03_merge wrote."
        ) from None
    if count == 0:
        reasons = _counted(collections.Counter(json.loads(attrs.get("failed_by_reason", "{}"))))
        raise PipelineError(
            f"{resolved} holds no embeddings: all {attrs.get('failed', 0):,} of its images failed "
            f"({reasons}), so there is nothing to search. Its failed/ group says why each one failed; run "
            "02_embed with RETRY_FAILED=True once their sources can be reached, then 03_merge."
        )
    return EmbeddingsFile(resolved, count, dimension, attrs)


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
    """What the saved index was built from: the merged file's chunk digests and size."""
    return hashlib.sha256(f"{embeddings.attrs.get('chunks')}:{embeddings.count}".encode()).hexdigest()


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


def load_ivf(embeddings: EmbeddingsFile) -> Any:
    """The file's IVF index: the one saved beside it when it is up to date, else built and saved."""
    import faiss

    path, key = _ivf_path(embeddings), _index_key(embeddings)
    record = path.with_name(path.name + ".json")
    saved = _read_json(record) if path.is_file() else {}
    if saved.get("key") == key:
        index = faiss.read_index(str(path))
        index.nprobe = saved["nprobe"]
        return index
    index = build_ivf(embeddings)
    with _atomic_file(path) as temporary:
        faiss.write_index(index, str(temporary))
    _write_json(record, {"key": key, "nlist": index.nlist, "nprobe": index.nprobe})
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
    encoder = load_encoder(chosen, device, "fp32", _recorded_commit(embeddings.attrs, chosen))
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
    recipe = ImageRecipe(encoder.preprocessing, exif_transpose=bool(embeddings.attrs.get("exif_transpose")))
    try:
        pixels = recipe(fetcher.fetch(location))
    except ImageFailure as failure:
        raise PipelineError(
            f"IMAGE_QUERY={query!r} is neither an image_id of {embeddings.path} nor an image that can be "
            f"embedded ({failure.reason})."
        ) from None
    return encoder.encode(pixels[None])[0]


def thumbnail(location: str, fetcher: Fetcher) -> bytes | None:
    """A JPEG thumbnail of the image at `location`, cached under .cache/thumbnails/; None if it fails."""
    path = WORKSPACE.thumbnails / (hashlib.sha256(location.encode()).hexdigest()[:24] + ".jpg")
    if path.is_file():
        return path.read_bytes()
    try:
        image = decode_image(fetcher.fetch(location)).convert("RGB")
    except ImageFailure:
        return None
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    with _atomic_file(path) as temporary:
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


# Exports: the .npy files the other notebooks use, or Parquet; optionally through PCA.


@dataclasses.dataclass(frozen=True)
class Pca:
    """A PCA fitted on a file's embeddings: vectors are centred, projected, then made unit length again."""

    mean: np.ndarray
    components: np.ndarray  # (PCA_DIM, D)
    explained_variance_ratio: np.ndarray

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        projected = ((vectors - self.mean) @ self.components.T).astype(np.float32)
        return projected / np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)


def fit_pca(embeddings: EmbeddingsFile, dimensions: int) -> Pca:
    """PCA by the covariance of all the file's embeddings, accumulated block by block in float64."""
    if dimensions > embeddings.dimension:
        raise ParameterError(
            f"PCA_DIM={dimensions} is more than the file's {embeddings.dimension} dimensions."
        )
    total = np.zeros(embeddings.dimension)
    products = np.zeros((embeddings.dimension, embeddings.dimension))
    for _, block in embeddings.blocks(reuse=True):
        block = block.astype(np.float64)
        total += block.sum(0)
        products += block.T @ block
    mean = total / embeddings.count
    covariance = products / embeddings.count - np.outer(mean, mean)
    variances, vectors = np.linalg.eigh(covariance)
    top = np.argsort(variances)[::-1][:dimensions]
    return Pca(
        mean.astype(np.float32), vectors[:, top].T.astype(np.float32), variances[top] / variances.sum()
    )


def export_embeddings(embeddings: EmbeddingsFile, kind: str, pca_dim: int | None = None) -> list[Path]:
    """Write the file's embeddings and ids as .npy files or Parquet beside it; return the paths."""
    pca = fit_pca(embeddings, pca_dim) if pca_dim else None
    stem = embeddings.path.stem + (f"_pca{pca_dim}" if pca else "")
    folder = embeddings.folder
    transform = pca.transform if pca else (lambda vectors: vectors)
    written = (
        _export_npy(embeddings, folder, stem, transform, pca_dim or embeddings.dimension)
        if kind == "npy"
        else _export_parquet(embeddings, folder / f"{stem}.parquet", transform)
    )
    if pca:
        components = folder / f"{stem}_components.npz"
        with _atomic_file(components) as temporary, open(temporary, "wb") as file:
            np.savez(
                file,
                mean=pca.mean,
                components=pca.components,
                explained_variance_ratio=pca.explained_variance_ratio,
            )
        written.append(components)
    return written


def _export_npy(
    embeddings: EmbeddingsFile, folder: Path, stem: str, transform: Callable, dimension: int
) -> list[Path]:
    """<stem>_embeddings.npy (N, dimension) float32, then _image_ids.npy and _urls.npy, in file order."""
    paths = [folder / f"{stem}_{name}.npy" for name in ("embeddings", "image_ids", "urls")]
    vectors = ((start, transform(block)) for start, block in embeddings.blocks(reuse=True))
    _write_npy(paths[0], np.float32, (embeddings.count, dimension), vectors)
    with open_hdf5(embeddings.path) as file:
        for path, name in zip(paths[1:], ("image_ids", "urls"), strict=True):
            strings = file[name].asstr()
            width = max(
                (max(map(len, ids), default=1) for _, ids in array_blocks(strings, embeddings.block_rows)),
                default=1,
            )
            _write_npy(path, f"<U{width}", (len(strings),), array_blocks(strings, embeddings.block_rows))
    return paths


def _write_npy(path: Path, dtype: Any, shape: tuple, blocks: Iterable[tuple[int, np.ndarray]]) -> None:
    """A .npy file filled block by block through a memory map, renamed into place when complete."""
    with _atomic_file(path) as temporary:
        array = np.lib.format.open_memmap(temporary, "w+", dtype, shape)
        for start, block in blocks:
            array[start : start + len(block)] = block
        array.flush()
        del array  # unmapped before the rename


def _export_parquet(embeddings: EmbeddingsFile, path: Path, transform: Callable) -> list[Path]:
    """One row per image: image_id, url, row, embedding (a list of float32), written block by block."""
    with _atomic_file(path) as temporary, open_hdf5(embeddings.path) as file:
        writer = None
        for start, block in embeddings.blocks(reuse=True):
            end = start + len(block)
            vectors = transform(block)
            table = pa.table(
                {
                    "image_id": file["image_ids"].asstr()[start:end],
                    "url": file["urls"].asstr()[start:end],
                    "row": file["rows"][start:end],
                    "embedding": pa.FixedSizeListArray.from_arrays(vectors.reshape(-1), vectors.shape[1]),
                }
            )
            writer = writer or pq.ParquetWriter(temporary, table.schema)
            writer.write_table(table)
        if writer:
            writer.close()
    return [path]


# ---------------------------------------------------------------------------------------------
# Environment (00_setup)
# ---------------------------------------------------------------------------------------------


def describe_device(device: str) -> str:
    """The device DEVICE resolves to, in words (GPU name and memory, or the CPU)."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        properties = torch.cuda.get_device_properties(resolved)
        return f"{resolved}: {properties.name}, {properties.total_memory / 2**30:.1f} GiB"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def prepare_folders(collection: Collection) -> dict[str, str]:
    """Create the collection's folder and .cache/, and report the free space of each."""
    report = {}
    for folder in (collection.folder, WORKSPACE.cache):
        check_writable(folder)
        report[str(folder)] = f"{shutil.disk_usage(folder).free / 2**30:,.1f} GiB free"
    return report


def describe_environment(device: str, collection: Collection) -> dict[str, str]:
    """Versions, device and free disk: what 00_setup prints."""
    return {
        **library_versions(),
        "device": describe_device(device),
        **prepare_folders(collection),
    }
