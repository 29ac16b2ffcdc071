"""01's first step: metadata (Open Images CSV, a listing, a folder, WebDataset shards) -> the table's rows.

Row i of the table is one image: image_id, url, location (what 02 fetches: an S3 key, a URL, a
path, or a byte range of a shard), rotation and md5, and for shards their samples' text members.
Every check of a listing happens here, before anything is embedded.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from .downloads import cached_download
from .errors import PipelineError, counted
from .fetch import OPENIMAGES_BUCKET, Fetcher
from .params import MetadataParams
from .shards import webdataset_samples
from .workspace import current_workspace, resolve_path, visible_files

LOCATION_SCHEMES = ("http", "https", "s3", "file")  # what 02 fetches as it is; anything else is a path


def _is_url(text: str) -> bool:
    return urlparse(text).scheme in ("http", "https")


def _local_copy(source: str, hint: str) -> Path:
    """A local file for a SOURCE that is a path, an http(s) URL or a Google Drive link."""
    if _is_url(source):
        return cached_download(source, hint)
    path = resolve_path(source)
    if not path.is_file():
        raise PipelineError(f"SOURCE file {path} does not exist. {hint}")
    return path


OPENIMAGES_METADATA = {
    "train": "https://storage.googleapis.com/openimages/2018_04/train/train-images-boxable-with-rotation.csv",
    "validation": "https://storage.googleapis.com/openimages/2018_04/validation/validation-images-with-rotation.csv",
    "test": "https://storage.googleapis.com/openimages/2018_04/test/test-images-with-rotation.csv",
}
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
        found = counted(collections.Counter(other))
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


def resolve_locations(urls: pd.Series, base: str) -> pd.Series:
    """Relative paths in a listing point next to the listing itself (a folder or a URL)."""

    def resolve(url: str) -> str:
        if urlparse(url).scheme in LOCATION_SCHEMES or os.path.isabs(url):
            return url
        return urljoin(base, url) if _is_url(base) else str(Path(base) / url)

    return urls.map(resolve)


def _listing_table(params: MetadataParams) -> pd.DataFrame:
    """A user's CSV, JSON or Parquet listing with at least `image_id` and `url` columns."""
    if isinstance(params.source, dict):
        frame, base = _table_from_columns(params.source), str(current_workspace().root)
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
            "location": resolve_locations(urls, base),
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


_OPENED_AS_JPEG = {"MPO"}  # multi-picture JPEGs, which Pillow's JPEG plugin opens


def _image_extensions() -> set[str]:
    """File extensions of every format Pillow can open."""
    extensions = Image.registered_extensions()  # first: this registers the plugins
    return {ext for ext, fmt in extensions.items() if fmt in Image.OPEN or fmt in _OPENED_AS_JPEG}


def _folder_table(params: MetadataParams) -> pd.DataFrame:
    """Every image file under a folder, recursively, sorted; image_id is the relative path."""
    folder = resolve_path(params.source)
    if not folder.is_dir():
        raise PipelineError(f"SOURCE folder {folder} does not exist or is not a folder.")
    relative = visible_files(folder, _image_extensions())
    paths = [str(folder / name) for name in relative]
    return pd.DataFrame(
        {"image_id": relative, "url": paths, "location": paths, "rotation": np.nan, "md5": ""}
    )


def _webdataset_table(params: MetadataParams) -> pd.DataFrame:
    """A row per WebDataset sample of SOURCE's shards; url is img2dataset's, else the image's location."""
    fetcher = Fetcher(params.s3_endpoint_url, s3_anonymous=params.s3_anonymous)
    samples = webdataset_samples(params.source, fetcher, _image_extensions())
    samples["url"] = samples["url"].where(samples["url"] != "", samples["location"])
    samples["rotation"], samples["md5"] = np.nan, ""  # img2dataset's md5 is of the bytes before its resizing
    others = [column for column in samples.columns if column not in TABLE_COLUMNS]
    return samples[[*TABLE_COLUMNS, *others]]


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
    """The normalised image table of a dataset: image_id, url, location (what to fetch), rotation, md5.

    WebDataset shards add a column per small text member of their samples (txt, json) and the caption
    of img2dataset's listing.
    """
    builders = {
        "openimages-v7": _openimages_table,
        "table": _listing_table,
        "folder": _folder_table,
        "webdataset": _webdataset_table,
    }
    table = builders[params.dataset](params).reset_index(drop=True)
    _check_table(table, params.source or OPENIMAGES_METADATA.get(params.split))
    return table.astype({"image_id": str, "url": str, "location": str, "rotation": "float64", "md5": str})
