"""What the stages read from where they run, and what they set in their process.

`Settings` holds the repository root, where OpenAI's `clip` keeps its downloads, the network's timeouts
and backoff, the block size of 04's reads, the cores to size for and the system calls that measure free
space and lock files; `configure` changes them for the process. `cpu_cores` is how many cores this
process may use.
`prepare_process` is the one call that changes libraries process-wide (Pillow's pixel limit, warning
filters, libtiff's and urllib3's messages, glibc's allocator); the stages that need it make it, so
`import lib` changes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the stages read from where they run; `configure` changes them for this process.

    HTTP sessions and Fetchers read the network's settings when they are made; the rest are read at
    each use. `disk_usage` and `flock` are how the disk and its locks are reached, replaceable to
    see how the stages meet a full disk or a filesystem without locks.
    """

    root: Path = Path(__file__).resolve().parents[2]  # the repository root: relative paths and .cache/
    clip_cache: Path = Path("~/.cache/clip")  # where OpenAI's clip.load keeps its downloads
    http_timeout: tuple[float, float] = (10, 60)  # seconds to connect, seconds between bytes
    fetch_deadline: float = 300  # seconds for one image's fetch, retries and waits included
    retry_backoff: float = 0.5  # urllib3's backoff_factor: a first retry at once, then 2x, 4x, 8x this (s)
    search_block_bytes: int = 256 << 20  # embeddings 04 reads at once: memory stays bounded whatever N is
    disk_usage: Callable[[Path], Any] = shutil.disk_usage  # how free disk space is measured
    flock: Callable[[int, int], None] = fcntl.flock  # how lock files are locked
    cores: int | None = None  # CPU cores the stages size themselves for; None: this process's affinity

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())
        object.__setattr__(self, "clip_cache", Path(self.clip_cache).expanduser())
        timeout = self.http_timeout
        if not (isinstance(timeout, tuple) and len(timeout) == 2 and all(map(_positive, timeout))):
            raise ValueError(
                f"http_timeout={timeout!r} is not allowed: use (seconds to connect, seconds between "
                "bytes), both > 0, such as (10, 60)."
            )
        if self.cores is not None and not (isinstance(self.cores, int) and _positive(self.cores)):
            raise ValueError(f"cores={self.cores!r} is not allowed: use an integer > 0, or None.")
        for name in ("fetch_deadline", "search_block_bytes"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: use a number > 0.")
        if not (_positive(self.retry_backoff) or self.retry_backoff == 0):
            raise ValueError(f"retry_backoff={self.retry_backoff!r} is not allowed: use seconds >= 0.")


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


_settings = Settings()


def current_settings() -> Settings:
    """The settings in force in this process."""
    return _settings


def configure(**changes: Any) -> Settings:
    """Change settings for the rest of this process (configure(fetch_deadline=60)); return the old ones."""
    global _settings
    known = [field.name for field in dataclasses.fields(Settings)]
    unknown = sorted(set(changes) - set(known))
    if unknown:
        raise TypeError(
            f"configure() has no setting {', '.join(unknown)}: the settings are {', '.join(known)}."
        )
    before = _settings
    _settings = dataclasses.replace(_settings, **changes)
    return before


@contextlib.contextmanager
def configured(**changes: Any) -> Iterator[Settings]:
    """configure(**changes) for the duration of a block: the settings before it are restored after it."""
    before = configure(**changes)
    try:
        yield current_settings()
    finally:
        configure(**vars(before))


def cpu_cores() -> int:
    """The cores this process sizes itself for: `cores` (a Ray worker's share), else its CPU affinity."""
    if current_settings().cores:
        return current_settings().cores
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_PILLOW_MODULES = r"PIL\."  # Pillow warns about each odd file it reads (corrupt EXIF, oversized tags)


def prepare_process(cpu_inference: bool = False) -> None:
    """Set what runs over millions of images need from the libraries of this process; idempotent.

    Pillow's process-wide decompression-bomb limit goes (decode_image checks each image against the
    run's MAX_PIXELS, from its header, before decoding); Pillow's warnings about odd files, libtiff's
    messages about corrupt TIFFs and urllib3's about retried requests go quiet (each image that still
    fails is recorded with its reason). With `cpu_inference`, glibc keeps freed memory for reuse.
    Each call checks what is set, so a warning filter that `warnings.catch_warnings` undid is set again.
    """
    Image.MAX_IMAGE_PIXELS = None
    if not _pillow_warnings_ignored():
        warnings.filterwarnings("ignore", category=UserWarning, module=_PILLOW_MODULES)
    retries = logging.getLogger("urllib3.connectionpool")
    if retries.level < logging.ERROR:
        retries.setLevel(logging.ERROR)
    _quiet_libtiff()
    if cpu_inference:
        keep_freed_memory()


def _pillow_warnings_ignored() -> bool:
    return any(
        action == "ignore" and category is UserWarning and getattr(module, "pattern", None) == _PILLOW_MODULES
        for action, _, category, module, _ in warnings.filters
    )


@functools.cache
def _quiet_libtiff() -> None:
    """Stop libtiff printing each corrupt TIFF's complaints to stderr, which a notebook shows (Linux).

    Only libtiff's own messages go: a TIFF it cannot decode still fails with its reason.
    """
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return
    from PIL import _imaging  # noqa: F401 (loads the libtiff that Pillow decodes with)

    loaded = {line.split()[-1] for line in maps.read_text().splitlines() if "libtiff" in line}
    for path in loaded:
        libtiff = ctypes.CDLL(path)
        for set_handler in (libtiff.TIFFSetWarningHandler, libtiff.TIFFSetErrorHandler):
            set_handler.restype = ctypes.c_void_p
            set_handler.argtypes = [ctypes.c_void_p]
            set_handler(None)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers in glibc's malloc.h


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse in this process; False where the C library is not glibc.

    A forward pass on the CPU allocates and frees activations of tens of MB. By default glibc maps
    each afresh and returns it to the kernel when freed, so every batch page-faults through hundreds
    of MB, about a tenth of ViT-B/32's time. Kept, the memory stays near its peak between batches.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, 1 << 30))
