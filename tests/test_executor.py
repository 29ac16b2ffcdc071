"""02's run: every row embedded or failed with its reason, retries, runs that share OUTPUT_DIR, the
reachability check, and what is checked before any chunk is written.
"""

import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable

import lib
import numpy as np
import pytest
from conftest import (
    child,
    closed_port_url,
    embed_params,
    official_metadata_csv,
    read_output,
    run_embed,
    save_table,
)

EMBED = """
import json, sys, time
from pathlib import Path
import conftest, lib
root, model, start, end, chunk = sys.argv[1:]
lib.configure(root=Path(root))
encoder = lib.load_encoder(model, "cpu", "fp32")
rows = {"start": int(start), "end": int(end), "chunk": int(chunk)}
print("ready", flush=True)
while not (Path(root) / "go").exists():  # both runs start embedding together
    time.sleep(0.01)
summary = conftest.run_embed(lib.load_image_table(lib.collection()), encoder, **rows)
print(json.dumps({"written": summary.chunks_written, "skipped": summary.chunks_skipped}))
"""


def slow_table(workspace, http_server, images, rows: int) -> None:
    """An image table whose images take `slow_seconds` each to arrive."""
    keys = sorted(images)
    urls = [http_server.url(f"/slow/images/{keys[row % len(keys)]}.jpg?run={row}") for row in range(rows)]
    listing = workspace.root / "slow.csv"
    listing.write_text("image_id,url\n" + "".join(f"{row},{url}\n" for row, url in enumerate(urls)))
    save_table(lib.MetadataParams("table", "validation", str(listing), "s3"), lib.collection())


@pytest.mark.parametrize(
    ("second_run", "first_chunk"),
    [((20, 40, 4), 4), ((0, 40, 4), 4), ((0, 40, 6), 4)],
    ids=["disjoint ranges", "the same chunks", "other chunk boundaries"],
)
def test_two_runs_at_once_write_every_row_once(
    collection, workspace, http_server, images, tiny_checkpoint, monkeypatch, second_run, first_chunk
):
    monkeypatch.setattr(http_server, "slow_seconds", 0.7)
    slow_table(workspace, http_server, images, 40)
    first = child(EMBED, workspace.root, tiny_checkpoint, 0, 40 if second_run[0] == 0 else 20, first_chunk)
    second = child(EMBED, workspace.root, tiny_checkpoint, *second_run)
    assert first.stdout.readline() == second.stdout.readline() == "ready\n"
    (workspace.root / "go").touch()
    outputs = [process.communicate(timeout=240) for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], (
        outputs[0][1][-2000:] + outputs[1][1][-2000:]
    )

    summaries = [json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs]
    chunks = lib.find_chunks(collection.chunks)
    assert sum(summary["written"] for summary in summaries) == len(chunks), "each chunk written once"
    report = lib.merge_chunks(collection, "OUTPUT/both.h5")  # refuses overlapping chunks
    assert report.gaps == [] and read_output(report.path)["rows"] == list(range(40))
    assert sorted(p.name for p in collection.chunks.iterdir()) == sorted(info.path.name for info in chunks)
    if second_run[0] == 0:
        assert "another run is embedding" in outputs[0][0] + outputs[1][0]


def test_a_run_that_meets_a_finished_chunk_covering_part_of_its_range_embeds_the_rest(
    collection, table, tiny_encoder
):
    """Runs over [0, 15) and [0, 20), CHUNK=6: the second planned [12, 18) before the first wrote [12, 15)."""
    params = embed_params(chunk=6)
    recipe = lib.plan.image_recipe(tiny_encoder, params)
    signature = lib.plan.run_signature(tiny_encoder, recipe, table, params.storage_dtype)
    second = lib.plan.plan_chunks(collection, 0, None, 6, signature, len(table))
    assert second.todo == [(0, 6), (6, 12), (12, 18), (18, 20)]
    run_embed(table, tiny_encoder, end=15, chunk=6)  # the first run, done before the second reaches 12
    summary = lib.embed_chunks(table, tiny_encoder, lib.plan.RunPlan(recipe, second), params)
    chunks = lib.find_chunks(collection.chunks)
    assert [(info.start, info.end) for info in chunks] == [(0, 6), (6, 12), (12, 15), (15, 18), (18, 20)]
    assert (summary.chunks_written, summary.attempted) == (2, 5)
    report = lib.merge_chunks(collection)
    merged = read_output(report.path)
    assert report.gaps == [] and sorted(merged["rows"] + merged["failed_rows"]) == list(range(20))


def interrupt_at_call(step: int, callers: list, cleanup: list) -> Callable[[], int]:
    """Raise KeyboardInterrupt at the `step`-th call made from `callers`, as a signal would arrive there.

    Python takes signals as calls begin and end, so each call from those functions, Python or C, is
    a moment an interrupt may come. Calls that begin a cleanup (`cleanup`, and every `__exit__`) are
    left alone: no Python code can finish a cleanup whose very first step is interrupted.
    """
    codes = {function.__code__ for function in callers}
    made = 0

    def profile(frame, event, arg):
        nonlocal made
        caller = frame if event == "c_call" else frame.f_back
        if event not in ("call", "c_call") or caller is None or caller.f_code not in codes:
            return
        callee = arg if event == "c_call" else frame.f_code
        if callee in cleanup or getattr(callee, "co_name", "") == "__exit__":
            return
        if getattr(callee, "co_filename", "").endswith("weakref.py"):  # a callback, not a call made here
            return
        made += 1
        if made == step:
            raise KeyboardInterrupt

    sys.setprofile(profile)
    return lambda: made


def test_an_interrupt_anywhere_in_a_claim_leaves_no_claim_behind(collection, table, tiny_encoder):
    """The stop button of a notebook, at any moment between claiming a chunk and releasing it."""
    claiming = [
        lib.executor.ChunkWriter.embed,
        lib.executor.ChunkWriter.retry,
        lib.claims.claim_chunk,
        lib.claims.FileLock.acquire,
    ]
    cleanup = [lib.claims.FileLock.release.__code__, os.close]
    for step in itertools.count(1):
        calls_made = interrupt_at_call(step, claiming, cleanup)
        try:
            run_embed(table, tiny_encoder, end=8)
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
        assert not [path for path in collection.chunks.glob("*.lock") if lib.claims.lock_holder(path)], step
        if calls_made() < step:  # the run went to its end without an interrupt
            break
    summary = run_embed(table, tiny_encoder)
    assert sum(info.embedded + info.failed for info in lib.find_chunks(collection.chunks)) == len(table)
    assert summary.chunks_skipped + summary.chunks_written == 3


def test_a_run_never_waits_for_a_claim_of_its_own_process(collection, table, tiny_encoder):
    """A claim that an interrupted cell left in this kernel is named, not waited for forever."""
    left_behind = lib.claims.claim_chunk(collection.chunks, 0, 8)
    outcome = []
    run = threading.Thread(
        target=lambda: outcome.append(_error_of(run_embed, table, tiny_encoder)), daemon=True
    )
    run.start()
    run.join(timeout=60)
    left_behind.release()
    assert not run.is_alive(), "the run waits for its own process"
    assert "This kernel itself holds a claim on rows [0, 8)" in str(outcome[0])
    assert "restart the kernel" in str(outcome[0])


def _error_of(function, *args) -> Exception | None:
    try:
        function(*args)
    except lib.PipelineError as error:
        return error
    return None


def test_a_chunk_that_waited_for_proof_and_meets_another_runs_claim_is_waited_for(
    collection, table, tiny_encoder
):
    """Not dropped: the other run may not finish those rows, and 02's last check counts every row."""
    writer = lib.executor.ChunkWriter(
        collection.chunks,
        table,
        tiny_encoder,
        loader=None,
        batch_size=3,
        attrs={},
        progress=lib.progress.RunProgress(0, lines=False),
        reach=lib.executor.SourceCheck(lib.Fetcher().s3_access),
        summary=lib.executor.RunSummary(0),
    )
    writer.unproven.append(lib.chunkfile.ChunkResult(0, 8, tiny_encoder.embedding_size))
    other_run = lib.claims.claim_chunk(collection.chunks, 0, 8)
    try:
        assert writer.write_unproven() == [(0, 8)]
    finally:
        other_run.release()
    assert not list(collection.chunks.glob("*.h5")) and writer.unproven == []


FAULTS = {  # row kind -> (URL path or S3 key pattern, expected reason; None: embedded)
    "good": ("/images/{key}.jpg?row={row}-{run}", None),
    "flaky": ("/flaky/images/{key}.jpg?row={row}-{run}", None),
    "s3": ("s3://open-images-dataset/validation/{key}.jpg", None),
    "missing": ("/status/404/{row}.jpg", "http 404"),
    "forbidden": ("/status/403/{row}.jpg", "http 403"),
    "unavailable": ("/status/503/{row}.jpg", "http 503"),
    "outage": ("/outage/images/{key}.jpg?row={row}-{run}", "http 503"),  # until the server is back
    "slow": ("/slow/images/{key}.jpg?row={row}-{run}", "timeout"),
    "trickle": ("/trickle/images/{key}.jpg?row={row}-{run}", "timeout"),
    "truncated": ("/truncated/images/{key}.jpg?row={row}-{run}", "truncated body"),
    "html": ("/html/{row}.jpg", "not an image"),
    "no such key": ("s3://open-images-dataset/validation/missing-{row}.jpg", "s3 NoSuchKey"),
    "huge": ("/huge/images/{key}.jpg?row={row}-{run}", "too large"),
}


ROWS_PER_KIND = 20


@pytest.fixture
def quick_faults(monkeypatch, fast_retries, http_server, configure):
    """Timeouts and the deadline short enough for a test; retries without their backoff sleeps."""
    configure(http_timeout=(5, 1.0), fetch_deadline=2.5)
    monkeypatch.setattr(http_server, "slow_seconds", 2.5)


def faulty_table(workspace, http_server, images, kinds) -> tuple[lib.table.ImageTable, list[str]]:
    """An image table of ROWS_PER_KIND rows of each kind, interleaved; and each row's kind."""
    keys = sorted(images)
    rows, row_kinds = [], []
    for row in range(ROWS_PER_KIND * len(kinds)):
        kind = kinds[row % len(kinds)]
        location = FAULTS[kind][0].format(key=keys[row % len(keys)], row=row, run=workspace.root.parent.name)
        rows.append((f"row-{row}", location if location.startswith("s3") else http_server.url(location)))
        row_kinds.append(kind)
    listing = workspace.root / "listing.csv"
    listing.write_text("image_id,url\n" + "".join(f"{i},{u}\n" for i, u in rows))
    return save_table(
        lib.MetadataParams("table", "validation", str(listing), "s3"), lib.collection()
    ), row_kinds


def merged_ledger() -> dict:
    """Merge the chunks; the merged file as plain Python, with the merge report."""
    report = lib.merge_chunks(lib.collection(), "OUTPUT/merged.h5")
    return read_output(report.path) | {"report": report}


def test_every_row_is_embedded_or_failed_with_the_reason_of_its_fault(
    workspace, http_server, s3_endpoint, images, tiny_encoder, quick_faults
):
    table, kinds = faulty_table(workspace, http_server, images, list(FAULTS))
    assert len(table) >= 200
    many_fetches = {"gpu_batch_size": 16, "num_workers": 8}
    summary = run_embed(table, tiny_encoder, chunk=64, s3_endpoint_url=s3_endpoint, **many_fetches)
    merged = merged_ledger()

    assert sorted(merged["rows"] + merged["failed_rows"]) == list(range(len(table)))
    expected = {row: FAULTS[kind][1] for row, kind in enumerate(kinds)}
    assert merged["rows"] == [row for row, reason in expected.items() if reason is None]
    assert dict(zip(merged["failed_rows"], merged["reasons"], strict=True)) == {
        row: reason for row, reason in expected.items() if reason is not None
    }
    run = workspace.root.parent.name  # the requests of this test, not of the others on the server
    recovered = [path for path in http_server.hits if path.startswith("/flaky/") and path.endswith(run)]
    assert len(recovered) == ROWS_PER_KIND and all(http_server.hits[path] == 2 for path in recovered)
    failed = len(merged["failed_rows"])
    assert summary.embedded == len(merged["rows"]) and sum(summary.failed_by_reason.values()) == failed
    assert merged["report"].failed_by_reason == dict(summary.failed_by_reason.most_common())


def test_each_chunk_records_its_statistics(
    collection, workspace, http_server, s3_endpoint, images, tiny_encoder, quick_faults
):
    table, _ = faulty_table(workspace, http_server, images, ["good", "missing", "truncated"])
    run_embed(table, tiny_encoder, chunk=25, s3_endpoint_url=s3_endpoint)
    for info in lib.find_chunks(collection.chunks):
        stats = json.loads(info.attrs["stats"])
        assert stats["attempted"] == info.end - info.start == stats["embedded"] + stats["failed"]
        assert sum(stats["failed_by_reason"].values()) == stats["failed"] == info.failed
        assert stats["bytes"] > 0 and stats["seconds"] > 0 and stats["retried"] == 0


def test_retry_failed_attempts_only_the_failed_rows_and_keeps_every_stored_vector(
    collection, workspace, http_server, images, tiny_encoder, quick_faults, monkeypatch
):
    table, kinds = faulty_table(workspace, http_server, images, ["good", "outage", "missing"])
    run_embed(table, tiny_encoder, chunk=16)
    before = {
        info.path.name: lib.chunkfile.read_chunk_result(info.path)
        for info in lib.find_chunks(collection.chunks)
    }
    failed_rows = {row for result in before.values() for row in result.failed.rows}
    assert failed_rows == {row for row, kind in enumerate(kinds) if kind != "good"}
    hits_before = dict(http_server.hits)

    monkeypatch.setattr(http_server, "outage", False)
    summary = run_embed(table, tiny_encoder, chunk=16, retry_failed=True)
    assert summary.chunks_written == 0 and summary.chunks_retried == len(before)
    assert summary.retried == len(failed_rows) and summary.recovered == ROWS_PER_KIND
    fetched = [path for path, hits in http_server.hits.items() if hits != hits_before.get(path)]
    assert len(fetched) == len(failed_rows), "only the failed rows are fetched again"

    for name, old in before.items():
        new = lib.chunkfile.read_chunk_result(collection.chunks / name)
        kept = np.isin(new.embedded.rows, old.embedded.rows)
        np.testing.assert_array_equal(new.embeddings()[kept], old.embeddings())
        assert sorted(new.embedded.rows + new.failed.rows) == list(range(new.start, new.end))
        assert set(new.reasons) == {"http 404"} and new.retried == len(old.failed.rows)
    assert not [
        path for path in collection.chunks.iterdir() if not lib.chunkfile.CHUNK_NAME.fullmatch(path.name)
    ]

    retried = merged_ledger()
    collection.chunks.rename(workspace.root / "retried-chunks")
    run_embed(table, tiny_encoder, chunk=16)  # a run with no outage at all
    clean = merged_ledger()
    assert (retried["rows"], retried["failed_rows"]) == (clean["rows"], clean["failed_rows"])
    np.testing.assert_allclose(retried["embeddings"], clean["embeddings"], atol=1e-6)


def test_a_placeholder_served_for_a_removed_photo_is_a_checksum_mismatch(
    collection, http_server, images, tiny_encoder, tmp_path
):
    """Flickr answers a removed photo with a placeholder image and status 200; OriginalMD5 tells."""
    keys = sorted(images)[:4]
    removed, placeholder = keys[3], keys[0]
    url_of = {key: http_server.url(f"/images/{key}.jpg") for key in keys}
    url_of[removed] = http_server.url(f"/images/{placeholder}.jpg")  # another picture, whole
    csv = tmp_path / "validation-images-with-rotation.csv"
    csv.write_bytes(official_metadata_csv({key: images[key] for key in keys}, url_of.get))
    table = save_table(lib.MetadataParams("openimages-v7", "validation", str(csv), "url"), collection)
    summary = run_embed(table, tiny_encoder)
    merged = merged_ledger()
    assert merged["image_ids"] == keys[:3] and merged["failed_ids"] == [removed]
    assert merged["reasons"] == ["checksum mismatch"] and summary.failed_by_reason == {"checksum mismatch": 1}


def listing_table(collection, folder, locations: list[str]) -> lib.table.ImageTable:
    """An image table of one row per location, with ids row-<n>."""
    listing = folder / "listing.csv"
    listing.write_text("image_id,url\n" + "".join(f"row-{n},{url}\n" for n, url in enumerate(locations)))
    return save_table(lib.MetadataParams("table", "validation", str(listing), "s3"), collection)


def test_a_run_that_reaches_none_of_its_images_stops_and_records_nothing(
    collection, tiny_encoder, fast_retries, tmp_path
):
    unreachable = closed_port_url("")
    table = listing_table(collection, tmp_path, [f"{unreachable}/x-{n}.jpg" for n in range(250)])
    with pytest.raises(lib.PipelineError) as error:
        run_embed(table, tiny_encoder, chunk=64)
    message = str(error.value)
    first = r"The first 20\d images of this run all failed \(connection error: 20\d\), "
    example = rf"e.g. {unreachable}/x-\d+.jpg \(connection error\): nothing answers there"
    assert re.match(first + example, message), message
    assert "recorded none of them" in message and "STOP_IF_UNREACHABLE=False" in message
    assert not list(collection.chunks.glob("*")), "no chunk of failures, no claim left"
    summary = run_embed(table, tiny_encoder, chunk=64, stop_if_unreachable=False)
    assert summary.chunks_written == 4 and summary.failed_by_reason == {"connection error": 250}


def test_a_run_whose_first_images_fail_but_later_ones_arrive_records_every_row(
    collection, tiny_encoder, fast_retries, tmp_path, image_folder
):
    unreachable = closed_port_url("")
    photos = sorted(str(path) for path in image_folder.glob("0*.jpg"))  # the whole ones
    locations = [f"{unreachable}/x-{n}.jpg" for n in range(150)] + photos
    table = listing_table(collection, tmp_path, locations)
    summary = run_embed(table, tiny_encoder, chunk=64)
    merged = merged_ledger()
    assert summary.chunks_written == 3 and len(merged["rows"]) == len(photos)
    assert merged["reasons"] == ["connection error"] * 150


def test_a_bucket_that_is_not_there_stops_the_run(collection, tiny_encoder, s3_endpoint, tmp_path):
    table = listing_table(collection, tmp_path, [f"s3://no-such-bucket/{n}.jpg" for n in range(200)])
    with pytest.raises(lib.PipelineError, match=r"\(s3 NoSuchBucket: 200\).*there is no such bucket"):
        run_embed(table, tiny_encoder, chunk=64, s3_endpoint_url=s3_endpoint)
    assert not list(collection.chunks.glob("*.h5"))


def test_a_second_retry_counts_each_failed_row_once(
    workspace, collection, http_server, images, tiny_encoder, quick_faults
):
    table, kinds = faulty_table(workspace, http_server, images, ["good", "outage"])
    run_embed(table, tiny_encoder, chunk=16)
    failed = kinds.count("outage")
    for _ in range(2):  # the outage goes on through two retries
        summary = run_embed(table, tiny_encoder, chunk=16, retry_failed=True)
        assert (summary.retried, summary.recovered) == (failed, 0)
        assert (
            f"failed images retried: {failed:,} in 3 chunk(s), recovered: 0, still failed: {failed:,}"
            in str(summary)
        )
    stats = [json.loads(info.attrs["stats"]) for info in lib.find_chunks(collection.chunks)]
    assert sum(chunk["retried"] for chunk in stats) == failed, "each chunk counts its latest retry"


def test_a_retry_of_rows_that_still_cannot_be_reached_is_not_stopped(
    collection, tiny_encoder, fast_retries, tmp_path
):
    """Their rows failed before: a retry that fails again records nothing new, and proves nothing."""
    unreachable = closed_port_url("")
    table = listing_table(collection, tmp_path, [f"{unreachable}/x-{n}.jpg" for n in range(250)])
    run_embed(table, tiny_encoder, chunk=64, stop_if_unreachable=False)
    summary = run_embed(table, tiny_encoder, chunk=64, retry_failed=True)
    assert (summary.retried, summary.recovered, summary.chunks_retried) == (250, 0, 4)


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


def test_the_summary_says_where_the_run_s_time_went(collection, table, tiny_encoder):
    summary = run_embed(table, tiny_encoder)
    assert 0 < summary.first_batch_seconds <= summary.waited_seconds < summary.seconds
    assert 0 < summary.write_seconds < summary.seconds
    assert re.search(
        r"^time: \d+\.\d s; the model waited \d+\.\d s for images \(\d+\.\d s for the first batch\); "
        r"writing chunk files took \d+\.\d s$",
        str(summary),
        re.MULTILINE,
    )
    stats = [json.loads(info.attrs["stats"]) for info in lib.find_chunks(collection.chunks)]
    assert sum(chunk["waited_seconds"] for chunk in stats) == pytest.approx(summary.waited_seconds, abs=0.01)
