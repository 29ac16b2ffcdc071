"""OUTPUT_DIR on object storage: a collection on the loopback S3, staged locally, written whole, leased.

01 to 04 on s3:// give the files a local OUTPUT_DIR gives; a second machine (a fresh staged copy)
resumes from the bucket; a run stopped between writing and uploading a chunk loses nothing; a
second run on the same collection is refused while the first holds its lease.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import boto3
import lib
import pytest
from conftest import assert_same_output, embed_params, merged_output, read_output, save_table
from test_notebooks import EMBED, papermill

BUCKET = "team-collections"


@pytest.fixture
def credentials(tmp_path, monkeypatch) -> None:
    """Credentials for the loopback S3 in the environment, and no instance-metadata lookups."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "team-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "team-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))


@pytest.fixture
def bucket(s3_endpoint, credentials) -> boto3.client:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    if BUCKET not in [found["Name"] for found in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def remote(bucket, workspace, s3_endpoint) -> lib.workspace.Collection:
    """A collection of its own in the bucket, for this test."""
    return lib.collection(f"s3://{BUCKET}/{workspace.root.parent.name}", s3_endpoint)


def objects(client, collection: lib.workspace.Collection) -> list[str]:
    prefix = collection.remote.removeprefix(f"s3://{BUCKET}/") + "/"
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(item["Key"].removeprefix(prefix) for item in listed)


def run_01(collection: lib.workspace.Collection, folder) -> lib.table.ImageTable:
    """01 over an image folder, into the collection."""
    params = lib.MetadataParams(
        "folder", "validation", str(folder), "s3", collection.name, collection.endpoint_url
    )
    return save_table(params, collection)


def run_02(collection: lib.workspace.Collection, checkpoint, **overrides) -> lib.executor.RunSummary:
    """02 as its notebook runs it, with the tiny model's folder."""
    params = embed_params(
        output_dir=collection.name,
        s3_endpoint_url=collection.endpoint_url,
        model=str(checkpoint),
        **overrides,
    )
    table = lib.load_image_table(collection)
    encoder = lib.run_encoder(params, collection)
    params = lib.with_machine_sizes(params, encoder)
    return lib.embed_chunks(table, encoder, lib.plan_run(params, collection, encoder, table), params)


@pytest.fixture
def local_output(image_folder, tiny_checkpoint) -> dict:
    """The merged file that a local OUTPUT_DIR gets from the same images and model."""
    local = lib.collection("LOCAL")
    run_01(local, image_folder)
    run_02(local, tiny_checkpoint)
    return merged_output(local)


def test_01_to_04_on_object_storage_make_the_files_a_folder_gets(
    remote, bucket, image_folder, tiny_checkpoint, local_output, capsys
):
    run_01(remote, image_folder)
    assert f"rows to {remote.name}/image_table.parquet" in capsys.readouterr().out
    summary = run_02(remote, tiny_checkpoint)
    assert summary.chunks_written == 3
    chunks = [f"chunks/chunk_{low:09d}_{min(low + 8, 20):09d}.h5" for low in (0, 8, 16)]
    assert objects(bucket, remote) == sorted(["image_table.parquet", *chunks])
    assert_same_output(merged_output(remote), local_output)
    assert "Images_Embedded.h5" in objects(bucket, remote)
    shutil.rmtree(remote.folder)  # another machine: nothing staged
    embeddings = lib.open_embeddings(remote)
    assert embeddings.count == 18 and embeddings.path == remote.merged_file


def test_another_machine_resumes_from_the_bucket(remote, bucket, image_folder, tiny_checkpoint, local_output):
    run_01(remote, image_folder)
    run_02(remote, tiny_checkpoint, end=8)
    shutil.rmtree(remote.folder)  # another machine
    summary = run_02(remote, tiny_checkpoint)
    assert (summary.chunks_skipped, summary.chunks_written) == (1, 2)
    assert_same_output(merged_output(remote), local_output)


def test_a_chunk_written_but_not_uploaded_is_uploaded_by_the_next_run(
    remote, bucket, image_folder, tiny_checkpoint
):
    run_01(remote, image_folder)
    run_02(remote, tiny_checkpoint)
    name = "chunks/chunk_000000008_000000016.h5"
    bucket.delete_object(Bucket=BUCKET, Key=f"{remote.remote.removeprefix(f's3://{BUCKET}/')}/{name}")
    (remote.folder / (name + ".remote.json")).unlink()  # as if killed between the rename and the upload
    summary = run_02(remote, tiny_checkpoint)
    assert (summary.chunks_skipped, summary.chunks_written) == (3, 0)
    assert name in objects(bucket, remote)


def test_cleanup_deletes_the_merged_chunks_from_the_bucket_and_the_staged_copy(
    remote, bucket, image_folder, tiny_checkpoint
):
    run_01(remote, image_folder)
    run_02(remote, tiny_checkpoint)
    report = lib.merge_chunks(remote, cleanup=True)
    assert report.kept == []
    assert objects(bucket, remote) == ["Images_Embedded.h5", "image_table.parquet"]
    assert not list(remote.chunks.glob("chunk_*.h5"))


def test_a_second_run_is_refused_while_the_first_holds_the_lease(
    remote, bucket, image_folder, tiny_checkpoint
):
    run_01(remote, image_folder)
    store = lib.storage.store_of(remote)
    holder = {"owner": "pid 12 on gpu-7", "stage": "02_embed", "token": "other", "expires": time.time() + 60}
    assert store.create(lib.storage.LEASE_NAME, json.dumps(holder).encode())
    with pytest.raises(lib.PipelineError, match=r"is in use by 02_embed \(pid 12 on gpu-7\) until at least"):
        run_02(remote, tiny_checkpoint)
    with pytest.raises(lib.PipelineError, match="is in use by 02_embed"):
        lib.merge_chunks(remote)
    store.replace(lib.storage.LEASE_NAME, json.dumps({**holder, "expires": time.time() - 1}).encode())
    assert run_02(remote, tiny_checkpoint).chunks_written == 3  # a dead run's lease is taken over
    assert lib.storage.LEASE_NAME not in objects(bucket, remote)


def test_a_bucket_that_does_not_exist_is_named(s3_endpoint, credentials, workspace, image_folder):
    missing = lib.collection("s3://no-such-bucket/collection", s3_endpoint)
    with pytest.raises(
        lib.PipelineError, match="Cannot write s3://no-such-bucket/collection: there is no such"
    ):
        run_01(missing, image_folder)


@pytest.mark.parametrize(
    ("output_dir", "message"),
    [
        ("https://example.com/out", "a web server cannot be written to"),
        ("nosuchfs://bucket/out", "fsspec knows no nosuchfs:// filesystem"),
    ],
)
def test_output_dirs_that_cannot_hold_a_collection_are_refused(output_dir, message):
    with pytest.raises(lib.ParameterError, match=message):
        embed_params(output_dir=output_dir)


def test_without_credentials_the_store_says_how_it_was_asked(
    s3_endpoint, bucket, workspace, image_folder, monkeypatch
):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    anonymous = lib.collection(f"s3://{BUCKET}/anonymous-{workspace.root.parent.name}", s3_endpoint)
    with pytest.raises(lib.PipelineError, match="the store refuses this machine, which asked anonymously"):
        run_01(anonymous, image_folder)


@pytest.mark.notebooks
def test_the_stage_notebooks_on_an_s3_output_dir(repo, kernel_env, bucket, s3_endpoint, image_folder):
    """papermill 01 -> 02 -> 03 -> 04 with OUTPUT_DIR an s3:// URL and S3_ENDPOINT_URL, as users run them."""
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")
    env = {**kernel_env, **{name: os.environ[name] for name in keys}}
    where = {"OUTPUT_DIR": f"s3://{BUCKET}/notebooks-{repo.parent.name}", "S3_ENDPOINT_URL": s3_endpoint}
    papermill(repo, "01_metadata", {**where, "DATASET": "folder", "SOURCE": str(image_folder)}, env)
    printed = papermill(repo, "02_embed", {**where, **EMBED, "CHUNK": 8}, env)
    assert "chunks written: 3, already done: 0" in printed
    printed = papermill(repo, "03_merge", {**where, "OUTPUT_FILE": None, "CLEANUP": True}, env)
    assert f"Uploaded the merged file to {where['OUTPUT_DIR']}/Images_Embedded.h5" in printed
    printed = papermill(repo, "04_search", {**where, "QUERIES": ["a red square"], "TOP_K": 3}, env)
    assert "18 embeddings of 16 dimensions" in printed
    left = objects(bucket, lib.collection(where["OUTPUT_DIR"]))
    assert left == ["Images_Embedded.h5", "image_table.parquet"], "CLEANUP deleted the chunks there too"


def test_a_chunk_rewritten_but_not_uploaded_goes_up_at_the_next_run(
    remote, bucket, image_folder, tiny_checkpoint, tmp_path
):
    run_01(remote, image_folder)
    run_02(remote, tiny_checkpoint)
    chunk = remote.chunks / "chunk_000000016_000000020.h5"
    attrs = read_output(chunk)["attrs"]
    # RETRY_FAILED rewrote it here, and a kill came before its upload
    lib.chunkfile.write_chunk(chunk, lib.chunkfile.read_chunk_result(chunk), {**attrs, "rewritten": "yes"})
    lib.storage.sync_chunks(remote)
    lib.storage.store_of(remote).download(f"chunks/{chunk.name}", tmp_path / "object.h5")
    assert read_output(tmp_path / "object.h5")["attrs"]["rewritten"] == "yes"
