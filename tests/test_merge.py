"""Merge: chunks -> one verified file in row order; bad chunk sets refused, gaps reported."""

# The reading snippet of the original notebook's README ("Output Format"), unchanged.
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import h5py
import lib
import numpy as np
import pytest
from conftest import HOLD_LOCK, child, read_output, run_embed
from merged_reading import reading_cells, traced_run
from workload import merged_layout

ORIGINAL_README_SNIPPET = textwrap.dedent(
    """
    import h5py

    with h5py.File('OUTPUT/Images_Embedded.h5', 'r') as f:
        urls = f['urls'][:]          # Array of image URLs (bytes)
        embeddings = f['embeddings'][:] # Array of normalized embeddings (float32)

        print(f"Number of images: {len(urls)}")
        print(f"Embedding dimension: {embeddings.shape[1]}")
        print(f"URL dtype: {urls.dtype}")
        print(f"Embedding dtype: {embeddings.dtype}")

    import h5py
    import numpy as np

    # Load the embeddings
    with h5py.File('OUTPUT/Images_Embedded.h5', 'r') as f:
        urls = [url.decode('utf-8') for url in f['urls'][:]]
        embeddings = f['embeddings'][:]

    # Example: Find most similar images
    query_embedding = embeddings[0]  # Use first image as query
    similarities = np.dot(embeddings, query_embedding)  # Cosine similarity (L2-normalized)
    top_indices = np.argsort(similarities)[::-1][:10]  # Top 10 most similar

    for idx in top_indices:
        print(f"Similarity: {similarities[idx]:.4f}, URL: {urls[idx]}")
    """
)
OUTPUT_FILE = "OUTPUT/Images_Embedded.h5"


@pytest.fixture
def chunks(collection, table, tiny_encoder):
    run_embed(table, tiny_encoder)
    return lib.find_chunks(collection.chunks)


def test_merged_file_holds_every_row_in_order(collection, chunks, workspace, table):
    report = lib.merge_chunks(collection, OUTPUT_FILE)
    merged = read_output(workspace.root / OUTPUT_FILE)
    assert report.embedded == 18 and report.failed == 2 and report.chunks == 3 and report.gaps == []
    assert merged["rows"] == list(range(18))
    assert merged["image_ids"] == table.rows(0, 18)["image_id"]
    assert [url.decode() for url in merged["urls"]] == table.rows(0, 18)["url"], "urls read back as bytes"
    assert merged["embeddings"].dtype == np.float32 and merged["embeddings"].shape == (18, 16)
    assert merged["failed_rows"] == [18, 19]
    assert merged["failed_ids"] == ["broken.jpg", "page.png"]
    assert merged["reasons"] == ["decode: truncated file", "not an image"]
    assert not list((workspace.root / "OUTPUT").glob("*.tmp"))


def test_merged_file_records_how_it_was_made(collection, chunks, workspace, tiny_encoder):
    lib.merge_chunks(collection, OUTPUT_FILE)
    attrs = read_output(workspace.root / OUTPUT_FILE)["attrs"]
    for key, value in tiny_encoder.signature().items():
        assert attrs[key] == (pytest.approx(value) if isinstance(value, list) else value)
    assert (
        attrs["model_id"] == str(tiny_encoder.checkpoint.path)
        and attrs["embedded"] == 18
        and attrs["failed"] == 2
    )
    assert json.loads(attrs["failed_by_reason"]) == {"decode: truncated file": 1, "not an image": 1}
    assert json.loads(attrs["source"])["dataset"] == "folder" and "transformers" in attrs["library_versions"]
    assert json.loads(attrs["gaps"]) == [] and len(json.loads(attrs["chunks"])) == 3
    assert attrs["device"] == "cpu" and attrs["preprocessing"] == lib.preprocess.PREPROCESSING_RULE
    assert (attrs["exif_transpose"], attrs["apply_rotation"]) == (False, False)
    assert attrs["max_pixels"] == lib.preprocess.DEFAULT_MAX_PIXELS


def run_original_snippet(root: Path) -> None:
    """The original README's snippet, run from `root` as from a repository where 03 has run."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        exec(ORIGINAL_README_SNIPPET, {})
    finally:
        os.chdir(cwd)


def test_the_original_readers_snippet_runs_unchanged(collection, chunks, workspace, capsys):
    lib.merge_chunks(collection, OUTPUT_FILE)
    run_original_snippet(workspace.root)
    out = capsys.readouterr().out
    assert "Number of images: 18" in out and "Embedding dimension: 16" in out
    assert "URL dtype: object" in out and "Similarity: 1.0000" in out


def test_a_merge_of_the_same_chunks_does_nothing(collection, chunks, workspace):
    lib.merge_chunks(collection, OUTPUT_FILE)
    written = (workspace.root / OUTPUT_FILE).stat().st_mtime_ns
    report = lib.merge_chunks(collection, OUTPUT_FILE)
    assert not report.written and "already up to date" in str(report)
    assert (workspace.root / OUTPUT_FILE).stat().st_mtime_ns == written


def test_cleanup_deletes_chunks_after_the_merged_file_is_verified(collection, chunks, workspace):
    report = lib.merge_chunks(collection, OUTPUT_FILE, cleanup=True)
    assert report.embedded == 18 and lib.find_chunks(collection.chunks) == []
    assert len(read_output(workspace.root / OUTPUT_FILE)["rows"]) == 18


def test_gaps_are_reported(collection, table, tiny_encoder, workspace):
    run_embed(table, tiny_encoder, start=0, end=5)
    run_embed(table, tiny_encoder, start=9, end=14)
    report = lib.merge_chunks(collection, OUTPUT_FILE)
    assert report.gaps == [(5, 9), (14, 20)]
    assert "rows never processed: 10, in [5, 9), [14, 20)" in str(report)
    assert json.loads(read_output(workspace.root / OUTPUT_FILE)["attrs"]["gaps"]) == [[5, 9], [14, 20]]


def test_overlapping_chunks_are_refused(collection, chunks, workspace):
    first = chunks[0]
    with (
        h5py.File(first.path, "r") as source,
        h5py.File(lib.chunkfile.chunk_path(collection.chunks, 4, 12), "w") as target,
    ):
        for name in source:
            source.copy(name, target)
        target.attrs.update({**source.attrs, "start": 4, "end": 12})
    with pytest.raises(
        lib.PipelineError, match=r"chunk_000000000_000000008.h5 and chunk_000000004_000000012.h5 overlap"
    ):
        lib.merge_chunks(collection, OUTPUT_FILE)
    assert not (workspace.root / OUTPUT_FILE).exists()


def test_chunks_of_different_models_are_refused(collection, chunks):
    with h5py.File(chunks[1].path, "r+") as file:
        file.attrs["model_revision"] = "another"
    first = (
        r"\(MODEL, MODEL_REVISION: .* \(model_revision 'sha256:[0-9a-f]+'\) chunk_000000000_000000008.h5, "
    )
    second = r".* \(model_revision 'another'\) chunk_000000008_000000016.h5\)"
    with pytest.raises(lib.PipelineError, match=r"were made differently " + first + second):
        lib.merge_chunks(collection, OUTPUT_FILE)


def test_a_damaged_chunk_never_replaces_the_merged_file(collection, table, tiny_encoder, workspace):
    run_embed(table, tiny_encoder, end=16)
    lib.merge_chunks(collection, OUTPUT_FILE)
    good = (workspace.root / OUTPUT_FILE).read_bytes()
    run_embed(table, tiny_encoder, start=16)  # a new chunk: the next merge rewrites the file
    with h5py.File(lib.find_chunks(collection.chunks)[0].path, "r+") as file:
        file["embeddings"][0] = -file["embeddings"][0]  # still unit length: only the digest can tell
    with pytest.raises(lib.PipelineError, match="does not reproduce .*chunk_000000000_000000008.h5"):
        lib.merge_chunks(collection, OUTPUT_FILE, cleanup=True)
    assert (workspace.root / OUTPUT_FILE).read_bytes() == good
    assert len(lib.find_chunks(collection.chunks)) == 3, "chunks are kept when verification fails"
    assert not list((workspace.root / "OUTPUT").glob("*.tmp"))


def test_embeddings_that_are_not_unit_length_are_refused(collection, chunks):
    with h5py.File(chunks[0].path, "r+") as file:
        file["embeddings"][3] = file["embeddings"][3] * 2
    with pytest.raises(lib.PipelineError, match=r"1 embedding\(s\) are not of unit length \(e.g. row 3"):
        lib.merge_chunks(collection, OUTPUT_FILE)


def test_datasets_that_do_not_fit_together_are_refused(collection, chunks):
    with h5py.File(chunks[1].path, "r+") as file:
        del file["image_ids"]
        file.create_dataset("image_ids", data=["only one"], dtype=h5py.string_dtype())
    with pytest.raises(
        lib.PipelineError, match=r"chunk_000000008_000000016.h5: its datasets do not fit together"
    ):
        lib.merge_chunks(collection, OUTPUT_FILE)


def test_a_chunk_in_which_every_image_failed(collection, workspace, tmp_path, tiny_encoder):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes(b"<html></html>")
    params = lib.MetadataParams("folder", "validation", str(folder), "s3")
    lib.save_image_table(lib.build_image_table(params), params, collection)
    run_embed(lib.load_image_table(collection), tiny_encoder)
    report = lib.merge_chunks(collection, OUTPUT_FILE)
    merged = read_output(workspace.root / OUTPUT_FILE)
    assert report.embedded == 0 and merged["embeddings"].shape == (0, 16)
    assert merged["failed_ids"] == ["a.jpg", "b.png"] and merged["reasons"] == ["not an image"] * 2


def test_no_chunks(collection):
    with pytest.raises(lib.PipelineError, match="no chunk files in .*: run 02_embed first"):
        lib.merge_chunks(collection, OUTPUT_FILE)


def test_an_unreadable_chunk_is_named(collection, chunks):
    shutil.copy(chunks[0].path, chunks[0].path.with_name("chunk_000000020_000000021.h5"))
    chunks[0].path.write_bytes(b"not hdf5")
    with pytest.raises(lib.PipelineError, match="chunk_000000000_000000008.h5 cannot be read"):
        lib.merge_chunks(collection, OUTPUT_FILE)


def test_a_file_held_open_for_writing_elsewhere_is_named(collection, chunks, workspace):
    lib.merge_chunks(collection, OUTPUT_FILE)
    run_embed(lib.load_image_table(collection), lib.load_encoder(chunks[0].attrs["model_id"], "cpu"), chunk=4)
    merged = workspace.root / OUTPUT_FILE
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import h5py, time; f = h5py.File({str(merged)!r}, 'a'); print(1, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        holder.stdout.readline()
        with pytest.raises(
            lib.PipelineError, match=r"Images_Embedded.h5 is locked: another process .*f.close\(\)"
        ):
            lib.merge_chunks(collection, OUTPUT_FILE)
    finally:
        holder.kill()
        holder.wait()


def test_a_merge_interrupted_while_cleaning_up_finishes_the_cleanup_and_loses_nothing(
    collection, chunks, workspace
):
    lib.merge_chunks(collection, OUTPUT_FILE)
    before = (workspace.root / OUTPUT_FILE).read_bytes()
    chunks[0].path.unlink()  # as CLEANUP does, one chunk after another, until the kill
    lib.claims.lock_path(chunks[0].path).write_text("pid 1 on a killed host")  # its claim, never released
    report = lib.merge_chunks(collection, OUTPUT_FILE, cleanup=True)
    assert report.written is False and report.embedded == 18 and report.chunks == 3
    assert (workspace.root / OUTPUT_FILE).read_bytes() == before and lib.find_chunks(collection.chunks) == []
    assert not list(collection.chunks.glob("*.lock")), "what the kill left is cleared"
    assert lib.merge_chunks(collection, OUTPUT_FILE).embedded == 18, "a later merge reports the file as it is"


def test_a_merge_that_would_drop_the_rows_of_cleaned_up_chunks_is_refused(
    chunks, collection, table, tiny_encoder
):
    lib.merge_chunks(collection, OUTPUT_FILE, cleanup=True)
    run_embed(table, tiny_encoder, start=0, end=4, chunk=4)  # new chunks after the cleanup
    with pytest.raises(lib.PipelineError, match=r"holds the rows of 3 chunk file\(s\) that are no longer"):
        lib.merge_chunks(collection, OUTPUT_FILE)
    assert lib.merge_chunks(collection, "OUTPUT/new.h5").embedded == 4


def test_too_little_disk_space_is_an_error_before_the_merge(collection, chunks, workspace, configure):
    full = shutil._ntuple_diskusage(total=10**9, used=10**9 - 1000, free=1000)
    configure(disk_usage=lambda path: full)
    with pytest.raises(lib.PipelineError, match=r"Not enough disk space for merging into .*0.00 GiB is free"):
        lib.merge_chunks(collection, OUTPUT_FILE)
    assert not (workspace.root / OUTPUT_FILE).exists()


def rewrite_after_the_merge(chunk: lib.chunkfile.ChunkInfo, monkeypatch) -> None:
    """Another run (RETRY_FAILED) rewrites `chunk` once the merged file is written, before the cleanup."""
    write_merged = lib.merge._write_merged

    def then_rewrite(*args):
        write_merged(*args)
        result = lib.chunkfile.read_chunk_result(chunk.path)
        result.vectors = [-result.embeddings()]  # other vectors, still of unit length
        lib.chunkfile.write_chunk(chunk.path, result, chunk.attrs)

    monkeypatch.setattr(lib.merge, "_write_merged", then_rewrite)


def test_cleanup_keeps_a_chunk_rewritten_after_it_was_merged(collection, chunks, monkeypatch):
    rewrite_after_the_merge(chunks[1], monkeypatch)
    report = lib.merge_chunks(collection, OUTPUT_FILE, cleanup=True)
    assert report.kept == [chunks[1].path.name] and "kept 1 chunk file(s)" in str(report)
    (left,) = lib.find_chunks(collection.chunks)
    assert left.path == chunks[1].path and left.attrs["digest"] != chunks[1].attrs["digest"]


def test_cleanup_keeps_a_chunk_that_another_run_holds(collection, chunks):
    claim = lib.claims.claim_chunk(collection.chunks, chunks[0].start, chunks[0].end, rewrite=True)
    try:
        report = lib.merge_chunks(collection, OUTPUT_FILE, cleanup=True)
    finally:
        claim.release()
    assert report.kept == [chunks[0].path.name]
    assert [info.path for info in lib.find_chunks(collection.chunks)] == [chunks[0].path]


def test_cleanup_deletes_chunks_under_the_merge_lock(collection, chunks, workspace, monkeypatch):
    merge_lock = lib.claims.lock_path(workspace.root / OUTPUT_FILE)
    held_while_deleting = []
    unlink = Path.unlink

    def watched_unlink(path, *args, **kwargs):
        if path.suffix == ".h5" and path.parent == collection.chunks:
            held_while_deleting.append(lib.claims.lock_holder(merge_lock) is not None)
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", watched_unlink)
    lib.merge_chunks(collection, OUTPUT_FILE, cleanup=True)
    assert held_while_deleting == [True, True, True]


@pytest.mark.parametrize(
    ("number", "message"),
    [
        (11, "is locked: another process .* holds it open for writing"),
        (38, r"does not support the file locks HDF5 takes .*HDF5_USE_FILE_LOCKING=FALSE"),
        (37, r"does not support the file locks HDF5 takes .*HDF5_USE_FILE_LOCKING=FALSE"),
    ],
    ids=["held open elsewhere", "no locks (ENOSYS)", "no locks (ENOLCK)"],
)
def test_hdf5_lock_failures_say_which_they_are(collection, table, tiny_encoder, monkeypatch, number, message):
    """HDF5 calls both a file held open elsewhere and a filesystem without locks 'unable to lock file'."""

    def unlockable(path, mode="r", **kwargs):
        strerror = os.strerror(number)
        raise OSError(
            f"Unable to synchronously create file (unable to lock file, errno = {number}, error message = "
            f"'{strerror}')"
        )

    monkeypatch.setattr(h5py, "File", unlockable)
    with pytest.raises(lib.PipelineError, match=message):
        run_embed(table, tiny_encoder, end=8)  # writing a chunk
    assert not list(collection.chunks.glob("*.h5"))


def test_03_reads_the_merged_file_in_bounded_memory(tmp_path):
    """03's reading cells on a file of 2M rows (400 MB): the original snippet's output, not every vector."""
    rows = 2_000_000
    path = tmp_path / "Images_Embedded.h5"
    merged_layout(path, rows)
    namespace = {"report": types.SimpleNamespace(path=path, embedded=rows)}
    peak_mib, printed = traced_run(reading_cells(), namespace)
    assert "Number of images: 2000000\nEmbedding dimension: 16\nURL dtype: object\n" in printed
    assert "Embedding dtype: float32\nFailed images: 0" in printed
    assert namespace["first_rows"]["image_id"].tolist()[:2] == ["0000000000000000", "0000000000000001"]
    assert peak_mib < 16, f"{peak_mib} MiB"


def test_a_second_merge_into_the_same_file_waits_for_the_first(workspace, table, tiny_encoder, capsys):

    run_embed(table, tiny_encoder)
    merged = workspace.root / "OUTPUT" / "merged.h5"
    holder = child(HOLD_LOCK, lib.claims.lock_path(merged))
    assert holder.stdout.readline() == "held\n"
    merge = threading.Thread(target=lib.merge_chunks, args=(lib.collection(), "OUTPUT/merged.h5"))
    merge.start()
    time.sleep(1)
    assert merge.is_alive() and not merged.exists()
    holder.kill()
    holder.wait()
    merge.join(timeout=60)
    assert not merge.is_alive() and merged.exists() and not lib.claims.lock_path(merged).exists()
    assert "Waiting for another merge into" in capsys.readouterr().out
