"""Runs that share OUTPUT/: lock files, claims per chunk, and what interrupted runs leave behind."""

import errno
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lib
import pytest
from conftest import REPO, embed_params, read_output, run_embed, save_table

HOLD_LOCK = """
import sys, time
from pathlib import Path
import conftest, lib
lib.claims.FileLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
"""

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


def child(code: str, *arguments) -> subprocess.Popen:
    """A Python process running `code` with the tests' imports."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, arguments)],
        cwd=REPO / "tests",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def lock_holder(tmp_path):
    """A child process holding the lock file tmp_path/held.lock until the test kills it."""
    process = child(HOLD_LOCK, tmp_path / "held.lock")
    assert process.stdout.readline() == "held\n"
    yield process
    process.kill()
    process.wait()


def test_a_lock_is_exclusive_across_processes_and_dies_with_its_holder(lock_holder, tmp_path):
    path = tmp_path / "held.lock"
    assert f"pid {lock_holder.pid} on " in lib.claims.lock_holder(path)
    assert not lib.claims.FileLock(path).acquire(blocking=False)
    lock_holder.kill()
    lock_holder.wait()
    assert path.exists() and lib.claims.lock_holder(path) is None, "SIGKILL leaves a stale file, not a lock"
    lock = lib.claims.FileLock(path)
    assert lock.acquire(blocking=False)
    lock.release()
    assert not path.exists()


def test_stale_lock_and_temporary_files_are_removed_and_live_ones_kept(collection):
    collection.chunks.mkdir(parents=True)
    stale = [
        "chunk_000000000_000000004.h5.lock",
        "chunk_000000000_000000004.h5.tmp",
        "chunk_000000004_000000008.h5.tmp",
    ]
    for name in stale:
        (collection.chunks / name).write_text("left by a killed run")
    live = lib.claims.claim_chunk(collection.chunks, 8, 12)
    (collection.chunks / "chunk_000000008_000000012.h5.tmp").write_text("being written")
    try:
        assert sorted(lib.claims.remove_stale_files(collection.chunks)) == sorted(stale)
        assert sorted(p.name for p in collection.chunks.iterdir()) == [
            "chunk_000000008_000000012.h5.lock",
            "chunk_000000008_000000012.h5.tmp",
        ]
    finally:
        live.release()


def test_a_claim_is_refused_while_another_covers_any_of_its_rows(collection):
    first = lib.claims.claim_chunk(collection.chunks, 0, 10)
    try:
        assert f"rows [0, 10): pid {os.getpid()}" in lib.claims.claim_chunk(collection.chunks, 5, 15)
        second = lib.claims.claim_chunk(collection.chunks, 10, 20)
        assert isinstance(second, lib.claims.FileLock)
        second.release()
    finally:
        first.release()
    (collection.chunks / "chunk_000000000_000000010.h5").write_bytes(b"finished")
    assert lib.claims.claim_chunk(collection.chunks, 5, 15) is None, "finished rows are not claimed again"
    assert not list(collection.chunks.glob("*.lock"))


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


def test_a_filesystem_without_locks_warns_and_goes_on(collection, configure):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    configure(flock=no_locks)
    with pytest.warns(UserWarning, match="does not support file locks"):
        claim = lib.claims.claim_chunk(collection.chunks, 0, 4)
    claim.release()
    assert not any(Path(collection.chunks).glob("*.lock"))


def test_a_run_that_meets_a_finished_chunk_covering_part_of_its_range_embeds_the_rest(
    collection, table, tiny_encoder
):
    """Runs over [0, 15) and [0, 20), CHUNK=6: the second planned [12, 18) before the first wrote [12, 15)."""
    params = embed_params(chunk=6)
    recipe = lib.plan.image_recipe(tiny_encoder, params)
    signature = lib.plan.run_signature(tiny_encoder, recipe, table)
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
        lib.executor._ChunkWriter.embed,
        lib.executor._ChunkWriter.retry,
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
    writer = lib.executor._ChunkWriter(
        collection.chunks,
        table,
        tiny_encoder,
        loader=None,
        batch_size=3,
        attrs={},
        progress=lib.progress.RunProgress(0, lines=False),
        reach=lib.executor.SourceCheck(),
        summary=lib.executor.RunSummary(0),
    )
    writer.unproven.append(lib.chunkfile.ChunkResult(0, 8, tiny_encoder.embedding_size))
    other_run = lib.claims.claim_chunk(collection.chunks, 0, 8)
    try:
        assert writer.write_unproven() == [(0, 8)]
    finally:
        other_run.release()
    assert not list(collection.chunks.glob("*.h5")) and writer.unproven == []
