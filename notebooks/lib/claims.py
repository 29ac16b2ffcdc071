"""Who writes what: one writer per chunk and per merged file, across processes sharing OUTPUT_DIR.

A claim is a lock file beside its chunk, held by flock() and so let go by the kernel when its
process dies; 02 claims each chunk before embedding it, 03 each chunk before deleting it (CLEANUP).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .chunkfile import CHUNK_NAME, chunk_path
from .errors import PipelineError
from .settings import current_settings
from .workspace import temporary_path

_LOCKS_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def _flock(fd: int, operation: int, path: Path) -> bool:
    """flock(fd, operation); False when LOCK_NB finds it held. A filesystem without locks warns once."""
    try:
        current_settings().flock(fd, operation)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno not in _LOCKS_UNSUPPORTED:
            raise
        warnings.warn(
            f"The filesystem of {path.parent} does not support file locks ({error.strerror}): two runs "
            "writing the same OUTPUT_DIR at once cannot be told apart. Give each run its own START and END.",
            stacklevel=3,
        )
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        found = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)


class FileLock:
    """An exclusive lock through a lock file that exists only while the lock is held.

    flock() locks belong to the open file, so the kernel drops them when their process dies, even
    by SIGKILL; the next process to lock the same path takes the stale file over.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; without `blocking`, return False at once when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not _flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB), self.path):
                    os.close(fd)
                    return False
                if _same_file(fd, self.path):  # else its holder removed it while we waited: again
                    os.ftruncate(fd, 0)
                    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}".encode())
                    self._fd = fd
                    return True
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (even if the removal is interrupted)."""
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


@contextlib.contextmanager
def _existing_lock_file(path: Path) -> Iterator[int | None]:
    """A descriptor of the lock file `path`, or None when there is no such file."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def lock_holder(path: Path) -> str | None:
    """Who holds the lock file `path` ("pid 12 on host, since ..."), or None when nobody does."""
    with _existing_lock_file(path) as fd:
        if fd is None or _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path):
            return None
        return os.pread(fd, 200, 0).decode(errors="replace") or "another process"


def check_not_held_here(claim: str) -> None:
    """An error, not a wait that never ends, for a claim this very process holds: an interrupted cell's."""
    if f"pid {os.getpid()} on {socket.gethostname()} since" in claim:
        raise PipelineError(
            f"This kernel itself holds a claim on {claim.split(':')[0]}, left by a run that was "
            "interrupted: restart the kernel (which lets go of it), then run 02_embed again."
        )


def wait_for_lock(path: Path) -> None:
    """Return once nobody holds the lock file `path`."""
    with _existing_lock_file(path) as fd:
        if fd is not None:
            _flock(fd, fcntl.LOCK_SH, path)


def lock_path(path: Path) -> Path:
    """The lock file of an output file."""
    return path.with_name(path.name + ".lock")


def _chunks_lock(folder: Path) -> FileLock:
    """Held for a moment while a run claims a chunk or clears what interrupted runs left."""
    return FileLock(folder / ".lock")


def chunk_ranges(folder: Path, suffix: str = "") -> dict[tuple[int, int], Path]:
    """Row ranges of the files in `folder` named chunk_<start>_<end>.h5 followed by `suffix`."""
    found = {}
    for path in folder.glob(f"chunk_*.h5{suffix}"):
        match = CHUNK_NAME.fullmatch(path.name.removesuffix(suffix))
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = path
    return found


def overlapping(ranges: Iterable[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    return [(low, high) for low, high in ranges if low < end and high > start]


def claim_chunk(folder: Path, start: int, end: int, rewrite: bool = False) -> FileLock | str | None:
    """The lock on rows [start, end) of the chunks in `folder` for this process, or why not.

    None: a finished chunk covers some of these rows (unless `rewrite`, for the chunk's own file).
    A string: who holds an overlapping claim, another run at work on these rows.
    """
    with _chunks_lock(folder):
        finished = set(chunk_ranges(folder)) - ({(start, end)} if rewrite else set())
        if overlapping(finished, start, end):
            return None
        claims = chunk_ranges(folder, ".lock")
        for low, high in overlapping(claims, start, end):
            holder = lock_holder(claims[(low, high)])
            if holder:
                return f"rows [{low}, {high}): {holder}"
        claim = FileLock(lock_path(chunk_path(folder, start, end)))
        if not claim.acquire(blocking=False):  # a process that locks chunks without claiming them
            return f"rows [{start}, {end}): {lock_holder(claim.path)}"
        try:
            temporary_path(chunk_path(folder, start, end)).unlink(missing_ok=True)
        except BaseException:
            claim.release()
            raise
        return claim


@contextlib.contextmanager
def claimed(folder: Path, start: int, end: int, rewrite: bool = False) -> Iterator[FileLock | str | None]:
    """claim_chunk for the duration of a block: the lock it takes is released however the block ends.

    An interrupt (a notebook's stop button) anywhere in between leaves no claim behind, so a later
    run in the same kernel does not wait on a claim of its own.
    """
    claim = None
    try:
        claim = claim_chunk(folder, start, end, rewrite)
        yield claim
    finally:
        if isinstance(claim, FileLock):
            claim.release()


def wait_for_claims(folder: Path, start: int, end: int) -> None:
    """Return once no other run holds a claim on any of rows [start, end)."""
    claims = chunk_ranges(folder, ".lock")
    for found in overlapping(claims, start, end):
        wait_for_lock(claims[found])


def remove_stale_files(folder: Path) -> list[str]:
    """Delete what interrupted runs left in a chunk folder: lock and temporary files nobody holds."""
    removed = []
    with _chunks_lock(folder):
        for claim in chunk_ranges(folder, ".lock").values():
            if lock_holder(claim) is None:
                claim.unlink()
                removed.append(claim.name)
        for temporary in chunk_ranges(folder, ".tmp").values():
            if not lock_path(temporary.with_suffix("")).exists():
                temporary.unlink()
                removed.append(temporary.name)
    return removed
