"""02's plan: finished chunks skipped, chunks made differently refused, sizes for the machine."""

import json
import os
import re
import shutil
import subprocess

import h5py
import lib
import pyarrow.parquet as pq
import pytest
from conftest import (
    FAKE_COMMIT,
    embed_params,
    read_output,
    retrained,
    run_embed,
    run_signature,
    save_table,
)


@pytest.mark.parametrize(
    ("option", "value", "difference"),
    [
        ("exif_transpose", True, "EXIF_TRANSPOSE: False recorded, True requested"),
        ("apply_rotation", True, "APPLY_ROTATION: False recorded, True requested"),
        ("preprocess", "fast", "PREPROCESS: 'exact' recorded, 'fast' requested"),
        ("preprocess", "pad", "PREPROCESS: 'exact' recorded, 'pad' requested"),
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
