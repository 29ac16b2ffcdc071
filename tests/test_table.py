"""The image table file: saved once per content, its info beside its rows, rows read alone."""

import hashlib
import itertools
import os
import pathlib
from collections.abc import Callable

import lib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import metadata


def test_saving_an_unchanged_table_does_nothing(collection, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    params = metadata("folder", str(folder))
    info = lib.save_image_table(lib.build_image_table(params), params, collection)
    written = collection.table.stat().st_mtime_ns
    assert lib.save_image_table(lib.build_image_table(params), params, collection) == info
    assert collection.table.stat().st_mtime_ns == written
    assert "already up to date" in capsys.readouterr().out
    loaded = lib.load_image_table(collection)
    assert len(loaded) == 1 and loaded.info == info
    assert loaded.rows(0, 1)["image_id"] == ["a.jpg"]


def test_a_changed_table_changes_its_digest(collection, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    params = metadata("folder", str(folder))
    first = lib.save_image_table(lib.build_image_table(params), params, collection)
    (folder / "b.jpg").write_bytes(b"x")
    second = lib.save_image_table(lib.build_image_table(params), params, collection)
    assert first["sha256"] != second["sha256"] and second["rows"] == 2


def test_checksums_added_to_a_listing_later_are_saved_and_keep_its_chunks(collection, tmp_path, images):
    keys = sorted(images)[:2]
    listing = tmp_path / "list.csv"
    listing.write_text("image_id,url\n" + "".join(f"{key},/x/{key}.jpg\n" for key in keys))
    params = metadata("table", str(listing))
    first = lib.save_image_table(lib.build_image_table(params), params, collection)
    digests = [hashlib.md5(images[key]).hexdigest() for key in keys]
    listing.write_text(
        "image_id,url,md5\n" + "".join(f"{k},/x/{k}.jpg,{d}\n" for k, d in zip(keys, digests, strict=True))
    )
    second = lib.save_image_table(lib.build_image_table(params), params, collection)
    assert lib.load_image_table(collection).rows(0, 2)["md5"] == digests
    assert second["sha256"] == first["sha256"], "the same images: their chunks stay valid"


def test_a_few_rows_of_a_large_table_are_read_without_the_rest(collection, monkeypatch):
    """04's thumbnails need the locations of a few rows of a table of millions."""
    rows = 300_000
    paths = [f"/data/{row:06d}.jpg" for row in range(rows)]
    table = pd.DataFrame({"image_id": paths, "url": paths, "location": paths, "rotation": np.nan, "md5": ""})
    params = metadata("folder", "/data")
    lib.save_image_table(table, params, collection)
    read = []
    read_row_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_group",
        lambda file, group, **kw: read.append(group) or read_row_group(file, group, **kw),
    )
    wanted = [299_999, 3, 131_072, 4]
    assert lib.table.table_values(collection.table, "location", wanted) == [paths[row] for row in wanted]
    assert sorted(read) == [0, 2, 4], "only the row groups that hold them"


def test_02_without_a_table_says_to_run_01(collection):
    with pytest.raises(
        lib.PipelineError,
        match=r"no image table in .*OUTPUT: run 01_metadata with OUTPUT_DIR='.*OUTPUT' first",
    ):
        lib.load_image_table(collection)


def test_wherever_a_save_is_interrupted_the_table_and_its_digest_agree(collection, tmp_path, monkeypatch):
    """A kill between writing a table and its record must never pair a new table with an old digest."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    params = metadata("folder", str(folder))
    lib.save_image_table(lib.build_image_table(params), params, collection)
    (folder / "b.jpg").write_bytes(b"x")
    for interrupted_step in itertools.count(1):
        steps = interrupt_at(interrupted_step, monkeypatch)
        try:
            lib.save_image_table(lib.build_image_table(params), params, collection)
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        loaded = lib.load_image_table(collection)
        assert loaded.info["sha256"] == lib.table.table_sha256(loaded.columns.to_pandas())
        if steps() < interrupted_step:  # the save ran to its end
            break
    assert len(lib.load_image_table(collection)) == 2


def interrupt_at(step: int, monkeypatch) -> Callable[[], int]:
    """Raise KeyboardInterrupt at the `step`-th file write or rename; return a count of those made."""
    made = 0

    def wrap(write):
        def interrupted(*args, **kwargs):
            nonlocal made
            made += 1
            if made == step:
                raise KeyboardInterrupt
            return write(*args, **kwargs)

        return interrupted

    monkeypatch.setattr(pq, "write_table", wrap(pq.write_table))
    monkeypatch.setattr(os, "replace", wrap(os.replace))
    monkeypatch.setattr(pathlib.Path, "write_text", wrap(pathlib.Path.write_text))
    return lambda: made
