"""Embed: rows in chunks, failures recorded, finished chunks skipped, foreign chunks refused."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import types

import h5py
import lib
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import (
    FAKE_COMMIT,
    TINY_IMAGE_SIZE,
    embed_params,
    jpeg_bytes,
    read_output,
    retrained,
    run_embed,
    run_signature,
    save_table,
)
from PIL import Image
from reference import reference_embeddings


def test_every_row_is_embedded_or_failed_with_its_reason(table, tiny_encoder, collection):
    summary = run_embed(table, tiny_encoder)
    assert summary.chunks_written == 3 and summary.attempted == len(table) == 20
    assert summary.embedded == 18
    assert dict(summary.failed_by_reason) == {"decode: truncated file": 1, "not an image": 1}
    chunks = lib.find_chunks(collection.chunks)
    assert [(c.start, c.end) for c in chunks] == [(0, 8), (8, 16), (16, 20)]
    assert sum(c.embedded + c.failed for c in chunks) == 20
    assert not list(collection.chunks.glob("*.tmp")), "no temporary file is left behind"
    last = read_output(chunks[-1].path)  # broken.jpg and page.png sort after the hex ids
    assert last["rows"] == [16, 17]
    assert last["failed_rows"] == [18, 19]
    assert last["reasons"] == ["decode: truncated file", "not an image"]


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


def test_embeddings_equal_the_model_on_openai_preprocessed_pixels(
    collection, table, tiny_encoder, image_folder
):
    run_embed(table, tiny_encoder)
    for info in lib.find_chunks(collection.chunks):
        chunk = read_output(info.path)
        images = [Image.open(io.BytesIO((image_folder / i).read_bytes())) for i in chunk["image_ids"]]
        expected = reference_embeddings(
            tiny_encoder.model, images, TINY_IMAGE_SIZE, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD
        )
        np.testing.assert_allclose(chunk["embeddings"], expected, atol=1e-6)


def test_apply_rotation_turns_each_row_by_the_tables_rotation(
    collection, image_folder, tiny_encoder, tmp_path
):
    names = sorted(path.name for path in image_folder.glob("*.jpg"))[:5]
    listing = tmp_path / "rotated.csv"
    rows = [f"{name},{image_folder / name},{90 * turns}" for turns, name in enumerate(names[:4])]
    rows.append(f"{names[4]},{image_folder / names[4]},")  # no rotation known: as is
    listing.write_text("image_id,url,rotation\n" + "\n".join(rows) + "\n")
    params = lib.MetadataParams("table", "validation", str(listing), "s3")
    lib.save_image_table(lib.build_image_table(params), params, collection)
    run_embed(lib.load_image_table(collection), tiny_encoder, apply_rotation=True)
    (chunk,) = [read_output(info.path) for info in lib.find_chunks(collection.chunks)]
    images = [Image.open(image_folder / name) for name in names]
    turned = [Image.fromarray(np.rot90(np.asarray(image), turns % 4)) for turns, image in enumerate(images)]
    expected = reference_embeddings(
        tiny_encoder.model, turned, TINY_IMAGE_SIZE, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD
    )
    np.testing.assert_allclose(chunk["embeddings"], expected, atol=1e-6)
    assert chunk["attrs"]["apply_rotation"] and not chunk["attrs"]["exif_transpose"]


@pytest.mark.parametrize(
    ("option", "value", "difference"),
    [
        ("exif_transpose", True, "EXIF_TRANSPOSE: False recorded, True requested"),
        ("apply_rotation", True, "APPLY_ROTATION: False recorded, True requested"),
        ("preprocess", "fast", "PREPROCESS: 'exact' recorded, 'fast' requested"),
    ],
)
def test_chunks_made_with_other_image_options_are_never_reused(
    collection, table, tiny_encoder, option, value, difference
):
    run_embed(table, tiny_encoder, end=8)
    with pytest.raises(lib.PipelineError, match=rf"made differently .*{difference}"):
        lib.plan.plan_chunks(
            collection, 0, None, 8, run_signature(tiny_encoder, table, **{option: value}), len(table)
        )


def test_collections_side_by_side_keep_their_own_table_chunks_and_merged_file(
    workspace, image_folder, tiny_encoder, tmp_path
):
    listing = tmp_path / "catalogue.csv"
    photos = sorted(image_folder.glob("*.jpg"))[:5]
    listing.write_text("image_id,url\n" + "".join(f"item-{n},{path}\n" for n, path in enumerate(photos)))
    sources = {"OUTPUT/photos": ("folder", image_folder), "OUTPUT/catalogue": ("table", listing)}
    for output_dir, (dataset, source) in sources.items():
        params = lib.MetadataParams(dataset, "validation", str(source), "s3", output_dir)
        table = save_table(params, lib.collection(output_dir))
        run_embed(table, tiny_encoder, output_dir=output_dir)
    reports = {output_dir: lib.merge_chunks(lib.collection(output_dir)) for output_dir in sources}
    assert reports["OUTPUT/photos"].path == workspace.root / "OUTPUT/photos/Images_Embedded.h5"
    assert (reports["OUTPUT/photos"].embedded, reports["OUTPUT/catalogue"].embedded) == (18, 5)
    assert read_output(reports["OUTPUT/catalogue"].path)["image_ids"] == [f"item-{n}" for n in range(5)]
    again = run_embed(
        lib.load_image_table(lib.collection("OUTPUT/photos")), tiny_encoder, output_dir="OUTPUT/photos"
    )
    assert again.chunks_written == 0 and again.chunks_skipped == 3
    assert not (workspace.root / "OUTPUT" / "chunks").exists() and not workspace.cache.exists()


def as_an_earlier_version_left_it(workspace, collection) -> None:
    """The layout of versions without OUTPUT_DIR: table and JSON record in .cache/, chunks in OUTPUT/."""
    workspace.cache.mkdir(exist_ok=True)
    table = pq.read_table(collection.table).drop_columns(["md5"])  # checksums came later
    record = {
        key: value for key, value in lib.table.table_info(collection.table).items() if key != "md5_sha256"
    }
    workspace.earlier_table.with_suffix(".json").write_text(json.dumps(record))
    pq.write_table(table.replace_schema_metadata({}), workspace.earlier_table)
    collection.table.unlink()


def test_a_collection_made_by_an_earlier_version_resumes(workspace, collection, table, tiny_encoder, capsys):
    run_embed(table, tiny_encoder, end=8)
    as_an_earlier_version_left_it(workspace, collection)
    resumed = lib.load_image_table(collection)
    assert "Moved the image table" in capsys.readouterr().out
    assert resumed.info["sha256"] == table.info["sha256"] and resumed.columns.equals(table.columns)
    assert not workspace.earlier_table.exists() and not workspace.earlier_table.with_suffix(".json").exists()
    summary = run_embed(resumed, tiny_encoder)
    assert summary.chunks_skipped == 1 and summary.chunks_written == 2
    params = lib.MetadataParams("folder", "validation", table.info["source"], "s3")
    assert lib.save_image_table(lib.build_image_table(params), params, collection) == table.info
    assert "Wrote the image table" in capsys.readouterr().out, "01 then records its checksums' digest"


def test_an_earlier_versions_chunks_are_moved_by_hand_into_a_new_collection_of_their_table(
    workspace, collection, table, tiny_encoder, image_folder
):
    run_embed(table, tiny_encoder, end=8)
    as_an_earlier_version_left_it(workspace, collection)
    params = lib.MetadataParams("folder", "validation", str(image_folder), "s3", "OUTPUT/photos")
    own = lib.collection("OUTPUT/photos")
    mine = save_table(params, own)
    with pytest.raises(lib.PipelineError) as error:
        run_embed(mine, tiny_encoder, output_dir="OUTPUT/photos")
    message = str(error.value)
    assert f"{collection.chunks} holds 1 chunk file(s) of this image table" in message
    move = re.search(r"move them here first: (.*?)\. To leave them", message).group(1)
    subprocess.run(move, shell=True, check=True)  # the command as the message gives it
    summary = run_embed(mine, tiny_encoder, output_dir="OUTPUT/photos")
    assert summary.chunks_skipped == 1 and summary.chunks_written == 2


def test_once_output_has_a_table_of_its_own_its_chunks_of_the_same_table_are_only_noted(
    workspace, collection, table, tiny_encoder, image_folder, capsys
):
    """The demo and a whole-split collection of the same listing: each may have its own chunks."""
    run_embed(table, tiny_encoder, end=8)
    params = lib.MetadataParams("folder", "validation", str(image_folder), "s3", "OUTPUT/photos")
    summary = run_embed(
        save_table(params, lib.collection("OUTPUT/photos")), tiny_encoder, output_dir="OUTPUT/photos"
    )
    assert summary.chunks_written == 3
    assert (
        f"Note: {collection.chunks} holds 1 chunk file(s) of this same image table" in capsys.readouterr().out
    )


def test_a_rerun_skips_finished_chunks(collection, table, tiny_encoder):
    run_embed(table, tiny_encoder)
    before = {c.path: c.path.stat().st_mtime_ns for c in lib.find_chunks(collection.chunks)}
    summary = run_embed(table, tiny_encoder)
    assert summary.chunks_written == 0 and summary.chunks_skipped == 3
    assert {c.path: c.path.stat().st_mtime_ns for c in lib.find_chunks(collection.chunks)} == before


def test_a_run_with_another_chunk_size_fills_only_the_gaps(collection, table, tiny_encoder):
    run_embed(table, tiny_encoder, start=4, end=12)
    signature = run_signature(tiny_encoder, table)
    plan = lib.plan.plan_chunks(collection, 0, None, 5, signature, len(table))
    assert plan.todo == [(0, 4), (12, 17), (17, 20)]
    assert [(c.start, c.end) for c in plan.done] == [(4, 12)]


def test_the_same_image_gives_the_same_vector_in_any_chunk(collection, table, tiny_encoder, workspace):
    run_embed(table, tiny_encoder, chunk=7, gpu_batch_size=2)
    by_row = {}
    for info in lib.find_chunks(collection.chunks):
        chunk = read_output(info.path)
        by_row.update(zip(chunk["rows"], chunk["embeddings"], strict=True))
    other = lib.workspace.Collection(workspace.root.parent / "other")  # a collection of the same table
    other.folder.mkdir()
    shutil.copy(collection.table, other.table)
    run_embed(
        lib.load_image_table(other), tiny_encoder, chunk=20, gpu_batch_size=5, output_dir=str(other.folder)
    )
    (whole,) = lib.find_chunks(other.chunks)
    chunk = read_output(whole.path)
    for row, vector in zip(chunk["rows"], chunk["embeddings"], strict=True):
        np.testing.assert_allclose(vector, by_row[row], atol=1e-6)


def test_chunks_of_another_model_or_precision_are_never_reused(
    collection, table, tiny_encoder, tiny_checkpoint
):
    run_embed(table, tiny_encoder, end=8)
    bf16 = lib.load_encoder(str(tiny_checkpoint), "cpu", "bf16")
    with pytest.raises(
        lib.PipelineError, match=r"made differently .*PRECISION: 'fp32' recorded, 'bf16' requested"
    ):
        lib.plan.plan_chunks(collection, 0, None, 8, run_signature(bf16, table), len(table))


def test_chunks_survive_moving_the_model_directory(
    collection, table, tiny_encoder, tiny_checkpoint, tmp_path
):
    run_embed(table, tiny_encoder)
    moved = lib.load_encoder(str(shutil.copytree(tiny_checkpoint, tmp_path / "moved")), "cpu", "fp32")
    plan = lib.plan.plan_chunks(collection, 0, None, 8, run_signature(moved, table), len(table))
    assert plan.todo == [] and len(plan.done) == 3


def test_chunks_of_another_image_table_are_never_reused(collection, table, tiny_encoder):
    run_embed(table, tiny_encoder, end=8)
    signature = {**run_signature(tiny_encoder, table), "table_sha256": "0" * 64}
    table = r"the image table \(01_metadata's DATASET, SPLIT, SOURCE, FETCH\)"
    values = r": folder '.*' \(sha256 [0-9a-f]{12}\) recorded, folder '.*' \(sha256 000000000000\) requested"
    with pytest.raises(lib.PipelineError, match=table + values):
        lib.plan.plan_chunks(collection, 0, None, 8, signature, len(table))


def test_a_resumed_run_keeps_the_revision_its_chunks_record_after_the_hub_moved(
    collection, table, hub_cache, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    import huggingface_hub

    cache = shutil.copytree(hub_cache, tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run_embed(table, lib.run_encoder(embed_params(model="ViT-B/32"), collection), model="ViT-B/32", end=8)
    repo = cache / "models--openai--clip-vit-base-patch32"
    moved = "f" * 40
    retrained(tiny_checkpoint, repo / "snapshots" / moved, seed=3)
    (repo / "refs" / "main").write_text(moved)
    assert lib.model.resolve_checkpoint("ViT-B/32").revision == moved, "main has moved on"
    capsys.readouterr()
    encoder = lib.run_encoder(embed_params(model="ViT-B/32"), collection)
    assert encoder.checkpoint.revision == FAKE_COMMIT
    assert f"MODEL_REVISION=None: continuing with revision {FAKE_COMMIT}" in capsys.readouterr().out
    summary = run_embed(table, encoder, model="ViT-B/32")
    assert (summary.chunks_skipped, summary.chunks_written) == (1, 2)


def test_precision_auto_that_resolves_otherwise_here_names_the_value_that_continues(
    collection, table, tiny_encoder
):
    run_embed(table, tiny_encoder, end=8)
    (info,) = lib.find_chunks(collection.chunks)
    with h5py.File(info.path, "r+") as file:
        file.attrs.update({"precision": "fp16", "device": "cuda"})  # as a GPU machine would have made it
    params = embed_params(model=str(tiny_encoder.checkpoint.path), device="cpu", precision="auto")
    with pytest.raises(
        lib.PipelineError,
        match=r"PRECISION='auto' is 'fp32' on cpu, but the chunks in .* were made in 'fp16' \(on cuda\): "
        r"set PRECISION='fp16' to continue this collection here",
    ):
        lib.run_encoder(params, collection)


def test_auto_sizes_follow_the_machine(table, tiny_encoder):
    auto = lib.with_machine_sizes(embed_params(gpu_batch_size="auto", num_workers="auto"), tiny_encoder)
    assert (auto.gpu_batch_size, auto.num_workers) == (lib.plan.CPU_BATCH_SIZE, len(os.sched_getaffinity(0)))
    explicit = lib.with_machine_sizes(embed_params(gpu_batch_size=7, num_workers=3), tiny_encoder)
    assert (explicit.gpu_batch_size, explicit.num_workers) == (7, 3)
    summary = run_embed(table, tiny_encoder, gpu_batch_size="auto", num_workers="auto")
    assert summary.attempted == len(table)


@pytest.mark.parametrize(
    ("budget", "per_image", "batch"),
    [(70e9, 2e6, 1024), (8e9, 20e6, 256), (1e9, 5e6, 128), (1e6, 5e6, 1)],
    ids=["H200: the limit", "a 16 GB card", "a small card", "not even one"],
)
def test_a_gpus_auto_batch_is_the_largest_power_of_two_that_fits(budget, per_image, batch):
    assert lib.plan.batch_for_memory(budget, per_image, 1024) == batch


def test_a_row_range_past_the_table_is_a_parameter_error(collection, table, tiny_encoder):
    signature = run_signature(tiny_encoder, table)
    with pytest.raises(
        lib.ParameterError, match=r"START=0, END=25 is outside the image table, which has 20 rows"
    ):
        lib.plan.plan_chunks(collection, 0, 25, 8, signature, len(table))
    with pytest.raises(lib.ParameterError, match="START=20"):
        lib.plan.plan_chunks(collection, 20, None, 8, signature, len(table))


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


class Gauge:
    """How many threads are inside a block at once, and the most there ever were."""

    def __init__(self):
        self.now = self.peak = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def inside(self):
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            yield
        finally:
            with self._lock:
                self.now -= 1


def test_fetches_outnumber_decoding_threads_and_images_come_in_order():
    photos = {f"photo-{index}": jpeg_bytes(40, 30, seed=index) for index in range(24)}
    fetching, decoding = Gauge(), Gauge()
    exact = lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(TINY_IMAGE_SIZE))

    class SlowNetwork:
        def fetch(self, location):
            with fetching.inside():
                time.sleep(0.05)
                return photos[location]

    def recipe(data, rotation):
        with decoding.inside():
            return exact(data, rotation)

    with lib.embed.ImageLoader(SlowNetwork(), recipe, workers=2, lookahead=40) as loader:
        loaded = list(loader.load(photos, [None] * len(photos)))
    assert decoding.peak <= 2 < fetching.peak <= lib.embed.FETCH_THREADS_PER_WORKER * 2
    for item, data in zip(loaded, photos.values(), strict=True):
        np.testing.assert_array_equal(item.pixels, exact(data))


def test_too_little_disk_space_is_an_error_before_any_chunk(table, tiny_encoder, collection, configure):
    needed = lib.embed.estimated_bytes(table, [(0, len(table))], tiny_encoder.embedding_size)
    assert 20 * (16 * 4 + 8) < needed < 20 * 2000
    full = shutil._ntuple_diskusage(total=10**9, used=10**9 - needed // 2, free=needed // 2)
    configure(disk_usage=lambda path: full)
    with pytest.raises(lib.PipelineError, match=r"Not enough disk space for 20 rows of chunk files"):
        run_embed(table, tiny_encoder)
    assert lib.find_chunks(collection.chunks) == []


def test_an_output_folder_without_write_permission_is_named(table, tiny_encoder, collection, monkeypatch):
    collection.folder.chmod(0o555)  # it holds the image table
    if os.geteuid() == 0:  # root may write anywhere: deny it as the kernel denies other users

        def denied(dir: str) -> None:
            raise PermissionError(13, "Permission denied", dir)

        monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    try:
        with pytest.raises(
            lib.PipelineError, match=rf"Cannot write in {collection.chunks} \(Permission denied\)"
        ):
            run_embed(table, tiny_encoder)
    finally:
        collection.folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


def test_headless_progress_prints_a_line_every_interval_even_while_nothing_arrives(capsys):
    with lib.progress.RunProgress(100, lines=True, interval=0.25) as progress:
        progress.add([None] * 10 + ["http 404"] * 3 + ["timeout"])
        time.sleep(1.1)  # a stalled source: no row arrives
        progress.chunk_written("chunk_000000000_000000014.h5")
    lines = capsys.readouterr().out.splitlines()
    timed = [line for line in lines if "written" not in line]
    assert 3 <= len(timed) <= 5, "one line per interval, and no more"
    rate, rest = (
        r"\[02\] 14 of 100 rows \(14\.0%\), [\d.]+ img/s",
        r", 4 failed \(most: http 404, 3\), about .+ left",
    )
    pattern = rate + rest
    assert all(re.fullmatch(pattern, line) for line in timed), timed
    assert lines[-1].startswith("[02] chunk_000000000_000000014.h5 written; 14 of 100 rows")


def test_chunks_written_closer_together_than_the_gap_share_a_line(capsys):
    """A small CHUNK on a fast GPU writes several chunks a second: not several lines a second."""
    with lib.progress.RunProgress(100, lines=True, interval=60, gap=0.5) as progress:
        for n in range(4):  # the first at once, the next three within the gap
            progress.add([None] * 10)
            progress.chunk_written(f"chunk_{n}.h5")
        time.sleep(0.6)
        progress.chunk_written("chunk_4.h5")  # past the gap: a line with the three that waited
        progress.chunk_written("chunk_5.h5")  # the last, in the line printed at the end
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("; ")[0] for line in lines] == [
        "[02] chunk_0.h5 written",
        "[02] 4 chunks written, the last chunk_4.h5",
        "[02] chunk_5.h5 written",
    ]


def test_progress_where_someone_watches_is_a_bar_not_lines(capsys):
    with lib.progress.RunProgress(100, lines=False, interval=0.05) as progress:
        progress.add([None] * 100)
        time.sleep(0.3)
        progress.chunk_written("chunk_000000000_000000100.h5")
    assert "[02]" not in capsys.readouterr().out


@pytest.mark.parametrize(("allow_stdin", "watched"), [(True, True), (False, False)])
def test_a_kernel_whose_front_end_can_answer_input_is_watched(monkeypatch, allow_stdin, watched):
    """JupyterLab, VS Code and Colab answer input() and render widgets; papermill and nbval do neither."""
    import IPython

    shell = types.SimpleNamespace(kernel=types.SimpleNamespace(_allow_stdin=allow_stdin))
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    assert lib.progress.watched() is watched
