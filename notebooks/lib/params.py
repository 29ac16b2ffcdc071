"""Each stage's parameters: one dataclass per stage, read from the notebook's namespace and checked.

Every stage notebook starts here: `read_parameters` turns the parameters cell (and what papermill
injected) into a frozen dataclass, or stops with what is wrong and what is allowed.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import re
import warnings
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from .errors import ParameterError
from .storage import check_store_url
from .workspace import DEFAULT_OUTPUT_DIR, is_url

DATASETS = ("openimages-v7", "table", "folder", "webdataset")
SPLITS = ("train", "validation", "test")
FETCH_MODES = ("s3", "url")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
PREPROCESS_MODES = ("exact", "fast", "pad")
EXECUTORS = ("local", "ray")
STORAGE_DTYPES = ("float32", "float16")
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
_PARAMETER_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
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
    if is_url(value):
        check_store_url(value)


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
    s3_endpoint_url: str | None = None
    s3_anonymous: bool = False

    def __post_init__(self) -> None:
        _check_s3_endpoint_url(self.s3_endpoint_url)
        _check_bool("S3_ANONYMOUS", self.s3_anonymous)
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
    executor: str = "local"
    ray_address: str | None = None
    cpus_per_worker: int | str = "auto"
    s3_anonymous: bool = False
    storage_dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_output_dir(self.output_dir)
        _check_choice("STORAGE_DTYPE", self.storage_dtype, STORAGE_DTYPES)
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
        _check_bool("S3_ANONYMOUS", self.s3_anonymous)
        _check_choice("EXECUTOR", self.executor, EXECUTORS)
        _check_text("RAY_ADDRESS", self.ray_address, optional=True)
        _check_size("CPUS_PER_WORKER", self.cpus_per_worker)
        if self.executor == "ray" and self.device.startswith("cuda:"):
            raise ParameterError(
                f"DEVICE={self.device!r} names one GPU, and EXECUTOR='ray' gives each worker a GPU of its "
                "own: use DEVICE='cuda' (or 'auto') with Ray, or EXECUTOR='local' for that one GPU."
            )


@dataclasses.dataclass(frozen=True)
class MergeParams:
    """Parameters of 03_merge."""

    output_file: str | None
    cleanup: bool
    output_dir: str = DEFAULT_OUTPUT_DIR
    s3_endpoint_url: str | None = None
    storage_dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_output_dir(self.output_dir)
        _check_s3_endpoint_url(self.s3_endpoint_url)
        _check_choice("STORAGE_DTYPE", self.storage_dtype, STORAGE_DTYPES)
        _check_text("OUTPUT_FILE", self.output_file, optional=True)
        _check_bool("CLEANUP", self.cleanup)


INDEXES = ("exact", "ivf")
EXPORTS = ("npy", "parquet", "clip-retrieval")
EXPORT_DTYPES = ("float32", "float16")


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
    s3_anonymous: bool = False
    export_dtype: str = "float32"
    export_shard_rows: int = 1_000_000
    app: bool = False
    host: str = "127.0.0.1"
    port: int | None = 7860
    share: bool = False
    max_pixels: int = 40_000_000
    max_upload_mb: int = 20

    def __post_init__(self) -> None:
        _check_output_dir(self.output_dir)
        _check_text("EMBEDDINGS", self.embeddings, optional=True)
        _check_s3_endpoint_url(self.s3_endpoint_url)
        _check_bool("S3_ANONYMOUS", self.s3_anonymous)
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
                    "set EXPORT='npy', 'parquet' or 'clip-retrieval' as well, or PCA_DIM=None."
                )
        _check_choice("EXPORT_DTYPE", self.export_dtype, EXPORT_DTYPES)
        _check_int("EXPORT_SHARD_ROWS", self.export_shard_rows, 1)
        self._check_app()

    def _check_app(self) -> None:
        _check_bool("APP", self.app)
        _check_text("HOST", self.host)
        if self.port is not None and not (_is_int(self.port) and 1 <= self.port <= 65535):
            raise ParameterError(
                f"PORT={self.port!r} is not allowed: use a TCP port from 1 to 65535, or None for the "
                "first free one from 7860."
            )
        _check_bool("SHARE", self.share)
        _check_int("MAX_PIXELS", self.max_pixels, 1)
        _check_int("MAX_UPLOAD_MB", self.max_upload_mb, 1)


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
