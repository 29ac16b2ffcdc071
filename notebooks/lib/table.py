"""The image table file: written by 01 into OUTPUT_DIR/image_table.parquet, read by 02, 03 and 04.

The table's info (its source and digest) lives in the Parquet file's own metadata, so no kill can
pair a table with another's info; `ImageTable` is the table as 02 slices it, chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import PipelineError
from .params import MetadataParams
from .sources import OPENIMAGES_METADATA, TABLE_COLUMNS
from .storage import pull, push
from .workspace import (
    DEFAULT_OUTPUT_DIR,
    Collection,
    atomic_file,
    current_workspace,
    read_json,
    resolve_path,
)


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
    pull(collection, collection.table)
    where = collection.where(collection.table)
    if table_info(collection.table) == info:
        print(f"The image table is already up to date: {len(table):,} rows in {where}")
        return info
    _write_table(pa.Table.from_pandas(table, preserve_index=False), info, collection.table)
    push(collection, collection.table)
    print(f"Wrote the image table: {len(table):,} rows to {where}")
    return info


TABLE_ROW_GROUP = 65_536  # rows per Parquet row group: a few rows can be read without the whole table


def _write_table(table: pa.Table, info: dict, path: Path) -> None:
    """The table with its info in the file's metadata, so that no kill can pair one with another's."""
    metadata = {**(table.schema.metadata or {}), TABLE_INFO_KEY: json.dumps(info).encode()}
    with atomic_file(path) as temporary:
        pq.write_table(table.replace_schema_metadata(metadata), temporary, row_group_size=TABLE_ROW_GROUP)


def table_values(path: Path, column: str, rows: Sequence[int]) -> list:
    """One column of an image table at the given rows, reading only the row groups that hold them."""
    return table_rows(path, rows, [column])[column].tolist()


def table_rows(path: Path, rows: Sequence[int], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The image table's `columns` (None: all) at these rows, reading only the row groups that hold them."""
    file = pq.ParquetFile(path)
    sizes = [file.metadata.row_group(group).num_rows for group in range(file.num_row_groups)]
    starts = np.cumsum([0, *sizes])
    rows = np.asarray(rows, dtype=np.int64)
    groups = np.searchsorted(starts, rows, side="right") - 1
    names = list(columns) if columns is not None else file.schema_arrow.names
    values = {name: np.empty(len(rows), dtype=object) for name in names}
    for group in np.unique(groups):
        held = groups == group
        read = file.read_row_group(int(group), columns=names)
        taken = read.take(pa.array(rows[held] - starts[group]))
        for name in names:
            values[name][held] = taken.column(name).to_pylist()
    return pd.DataFrame(values, columns=names).infer_objects()


def table_info(path: Path) -> dict | None:
    """The info an image table file records; None when there is no such file, or it records none."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):  # missing, or not a whole Parquet file
        return None
    return json.loads(metadata[TABLE_INFO_KEY]) if TABLE_INFO_KEY in metadata else None


def _move_earlier_table(collection: Collection) -> None:
    """Move the table that versions without OUTPUT_DIR kept in .cache/ into OUTPUT/, where its chunks are."""
    earlier = current_workspace().earlier_table
    record = read_json(earlier.with_suffix(".json"))
    if collection.folder != resolve_path(DEFAULT_OUTPUT_DIR) or collection.table.exists():
        return
    if not (earlier.is_file() and record):
        return
    table = pq.read_table(earlier)
    if "md5" not in table.column_names:  # no checksums then; strings typed as pandas types the others
        text = table.schema.field("image_id").type
        table = table.append_column("md5", pa.array([""] * table.num_rows, text))
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
    """The table that 01_metadata wrote into the collection (a remote one's, brought here first)."""
    _move_earlier_table(collection)
    if collection.remote and not pull(collection, collection.table):
        raise PipelineError(_no_table(collection))
    info = table_info(collection.table)
    if info is None:
        raise PipelineError(_no_table(collection))
    return ImageTable(pq.read_table(collection.table, columns=list(TABLE_COLUMNS)), info)


def _no_table(collection: Collection) -> str:
    """Why a collection has no image table, and what to do."""
    again = f"run 01_metadata with OUTPUT_DIR={collection.name!r}"
    if collection.table.exists():
        return f"{collection.table} is not an image table that 01_metadata wrote (it is damaged): {again}."
    message = f"There is no image table in {collection.name}: {again} first."
    earlier = current_workspace().earlier_table
    if earlier.is_file():
        message += (
            f" ({earlier}, made by an earlier version, is the table of the collection in "
            f"{resolve_path(DEFAULT_OUTPUT_DIR)}: it moves there when 01_metadata or 02_embed runs with "
            f"OUTPUT_DIR={DEFAULT_OUTPUT_DIR!r}.)"
        )
    return message
