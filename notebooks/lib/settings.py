"""What the stages read from where they run, and what they set in their process.

`Settings` holds the repository root, the network's timeouts and backoff, the block size of 04's reads
and the system calls that measure free space and lock files; `configure` changes them for the process.
`prepare_process` is the one call that changes libraries process-wide (Pillow's pixel limit, warning
filters, libtiff's and urllib3's messages, glibc's allocator); the stages that need it make it, so
`import lib` changes nothing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import functools
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import ParameterError


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the stages read from where they run; `configure` changes them for this process."""

    root: Path = Path(__file__).resolve().parents[2]  # the repository root: relative paths and .cache/
    http_timeout: tuple[float, float] = (10, 60)  # seconds to connect, seconds between bytes
    fetch_deadline: float = 300  # seconds for one image's fetch, retries and waits included
    retry_backoff: float = 0.5  # seconds before an HTTP request's second retry, doubling for each next
    search_block_bytes: int = 256 << 20  # embeddings 04 reads at once: memory stays bounded whatever N is
    disk_usage: Callable[[Path], Any] = shutil.disk_usage  # how free disk space is measured
    flock: Callable[[int, int], None] = fcntl.flock  # how lock files are locked


_settings = Settings()


def current_settings() -> Settings:
    """The settings in force in this process."""
    return _settings


def configure(**changes: Any) -> Settings:
    """Change settings for the rest of this process, e.g. configure(fetch_deadline=60); return those before.

    `configure(**vars(before))` restores them.
    """
    global _settings
    unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(Settings)})
    if unknown:
        names = ", ".join(field.name for field in dataclasses.fields(Settings))
        raise ParameterError(f"configure() has no setting {', '.join(unknown)}: the settings are {names}.")
    before = _settings
    _settings = dataclasses.replace(_settings, **changes)
    return before


def prepare_process(cpu_inference: bool = False) -> None:
    """Set what runs over millions of images need from the libraries of this process; idempotent.

    Pillow's process-wide decompression-bomb limit goes (decode_image checks each image against the
    run's MAX_PIXELS, from its header, before decoding); Pillow's warnings about odd files, libtiff's
    messages about corrupt TIFFs and urllib3's about retried requests go quiet (each image that still
    fails is recorded with its reason). With `cpu_inference`, glibc keeps freed memory for reuse.
    """
    _quiet_and_unlimited_images()
    if cpu_inference:
        keep_freed_memory()


@functools.cache
def _quiet_and_unlimited_images() -> None:
    Image.MAX_IMAGE_PIXELS = None
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    _quiet_libtiff()
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


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
