"""Claims and locks: one writer per chunk across processes; what interrupted runs leave is cleared."""

import errno
import os
from pathlib import Path

import lib
import pytest
from conftest import HOLD_LOCK, child


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


def test_a_filesystem_without_locks_warns_and_goes_on(collection, configure):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    configure(flock=no_locks)
    with pytest.warns(UserWarning, match="does not support file locks"):
        claim = lib.claims.claim_chunk(collection.chunks, 0, 4)
    claim.release()
    assert not any(Path(collection.chunks).glob("*.lock"))
