"""Chunk files: whole or absent, attributes that say how they were made, older formats named."""

import h5py
import lib
import pytest
from conftest import (
    TINY_IMAGE_SIZE,
    run_embed,
)


def test_chunk_files_record_how_they_were_made(collection, table, tiny_encoder):
    run_embed(table, tiny_encoder)
    attrs = lib.find_chunks(collection.chunks)[0].attrs
    assert attrs["model_id"] == str(tiny_encoder.checkpoint.path)
    assert attrs["model_revision"].startswith("sha256:") and attrs["embedding_size"] == 16
    assert attrs["image_size"] == TINY_IMAGE_SIZE and attrs["precision"] == "fp32"
    assert attrs["image_mean"] == pytest.approx(lib.preprocess.OPENAI_MEAN) and attrs["device"] == "cpu"
    assert attrs["table_sha256"] == table.info["sha256"] and (attrs["start"], attrs["end"]) == (0, 8)
    assert "torch" in attrs["library_versions"] and '"dataset": "folder"' in attrs["source"]
    assert '"failed_by_reason"' in attrs["stats"] and '"seconds"' in attrs["stats"]
    assert (
        attrs["preprocessing"] == lib.preprocess.PREPROCESSING_RULE
        and attrs["max_pixels"] == lib.preprocess.DEFAULT_MAX_PIXELS
    )


def test_a_chunk_is_written_whole_or_not_at_all(table, tiny_encoder, collection, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lib.workspace, "fsync_and_replace", fail)
    with pytest.raises(OSError, match="disk full"):
        run_embed(table, tiny_encoder, end=8)
    assert lib.find_chunks(collection.chunks) == [] and not list(collection.chunks.glob("*"))


def test_a_chunk_in_an_older_format_is_named_and_never_reused(collection, table, tiny_encoder):
    run_embed(table, tiny_encoder, end=8)
    (info,) = lib.find_chunks(collection.chunks)
    with h5py.File(info.path, "r+") as file:
        file.attrs["format_version"] = 1
    with pytest.raises(lib.PipelineError, match=r"chunk_000000000_000000008.h5 is in format 1, .* format 2"):
        run_embed(table, tiny_encoder)
