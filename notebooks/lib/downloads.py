"""Whole files over HTTP(S) or from Google Drive, fetched once into .cache/downloads/ and verified.

01 reads its metadata (SOURCE) through `cached_download`; the HTTP session, its retry policy and the
per-fetch deadline (`DeadlineRetry`) also serve 02's image fetches (fetch).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
import urllib3

from .errors import PipelineError
from .progress import progress_bar
from .settings import current_settings, prepare_process
from .workspace import current_workspace, fsync_and_replace, read_json, sha256_of_file, write_json


class PastDeadline(Exception):
    """A retry would wait past the fetch's deadline; `status` is the answer it would have retried."""

    def __init__(self, status: int | None):
        super().__init__(status)
        self.status = status


class DeadlineRetry(urllib3.Retry):
    """urllib3's Retry that never waits past the deadline of the fetch under way in this thread.

    A server's Retry-After (which urllib3 honours, for up to 6 hours) or a backoff that would end
    after the deadline ends the fetch at once, as the failure of the answer it would have retried.
    """

    deadlines = threading.local()  # a class attribute: shared by the copies urllib3 makes of a Retry

    def sleep(self, response: Any = None) -> None:
        retry_after = self.get_retry_after(response) if response and self.respect_retry_after_header else None
        self._check_deadline(retry_after or self.get_backoff_time(), response)
        super().sleep(response)

    def sleep_for_retry(self, response: Any) -> bool:
        self._check_deadline(self.get_retry_after(response) or 0, response)
        return super().sleep_for_retry(response)

    @staticmethod
    def _check_deadline(wait: float, response: Any) -> None:
        deadline = getattr(DeadlineRetry.deadlines, "at", None)
        if deadline is not None and time.monotonic() + wait > deadline:
            raise PastDeadline(response.status if response is not None else None)


def http_retry() -> DeadlineRetry:
    """The retry policy of every HTTP request: transient failures again, after the configured backoff."""
    return DeadlineRetry(
        total=4,
        read=2,
        backoff_factor=current_settings().retry_backoff,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=("GET", "HEAD"),
        raise_on_status=False,
    )


def http_session(pool_size: int = 10) -> requests.Session:
    """A requests session that retries transient failures (urllib3's Retry) with backoff."""
    prepare_process()
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(
        max_retries=http_retry(), pool_connections=pool_size, pool_maxsize=pool_size
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _cached_download_is_valid(path: Path, record_path: Path, url: str) -> bool:
    if not path.is_file():
        return False
    record = read_json(record_path)
    return (
        record.get("url") == url
        and record.get("size") == path.stat().st_size
        and record.get("sha256") == sha256_of_file(path)
    )


def root_cause(error: requests.RequestException) -> Any:
    """The urllib3 error behind a requests error (a MaxRetryError holds the last attempt's)."""
    cause = error.args[0] if error.args else None
    return getattr(cause, "reason", cause)


def _network_problem(error: requests.RequestException, url: str) -> str:
    """A few words on why a request failed, instead of urllib3's chain of wrapped errors."""
    host = urlparse(url).netloc
    cause = root_cause(error)
    if isinstance(cause, urllib3.exceptions.NameResolutionError):
        return f"cannot resolve {urlparse(url).hostname} (is this machine offline?)"
    if isinstance(cause, urllib3.exceptions.NewConnectionError):
        return f"cannot connect to {host}"
    if isinstance(error, requests.Timeout) or isinstance(cause, urllib3.exceptions.TimeoutError):
        return f"{host} did not answer in time"
    return str(error).splitlines()[0]


def _download_http(url: str, destination: Path) -> None:
    """Stream `url` into `destination`, checking that every announced byte arrived."""
    with (
        http_session() as session,
        session.get(url, stream=True, timeout=current_settings().http_timeout) as reply,
    ):
        if reply.status_code != 200:
            raise OSError(f"the server answered HTTP {reply.status_code}")
        expected = int(reply.headers.get("Content-Length", 0)) or None
        with (
            open(destination, "wb") as file,
            progress_bar(
                total=expected, unit="B", unit_scale=True, desc=f"download {Path(urlparse(url).path).name}"
            ) as progress,
        ):
            for block in reply.iter_content(1 << 20):
                file.write(block)
                progress.update(reply.raw.tell() - progress.n)
        received = reply.raw.tell()  # bytes over the wire, as Content-Length counts a gzip-encoded body
    if expected is not None and received != expected:
        raise OSError(f"received {received} of {expected} bytes")


def _is_google_drive(text: str) -> bool:
    return urlparse(text).hostname in ("drive.google.com", "docs.google.com")


def _download_google_drive(url: str, folder: Path) -> Path:
    """Fetch a Google Drive link with gdown, keeping the file's own name (and so its extension)."""
    import gdown

    saved = gdown.download(url, output=str(folder) + os.sep, quiet=False, fuzzy=True)
    if not saved:
        raise OSError("gdown could not fetch it (is the file shared with 'anyone with the link'?)")
    return Path(saved)


def cached_download(url: str, hint: str) -> Path:
    """A verified local copy of `url` under .cache/downloads/, fetched once and checked by size and hash.

    `hint` tells the user what to do when the URL cannot be reached.
    """
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    folder = current_workspace().downloads / key
    for record_path in folder.glob("*.download.json"):
        path = record_path.with_name(record_path.name.removesuffix(".download.json"))
        if _cached_download_is_valid(path, record_path, url):
            print(f"Using the cached copy of {url} ({path})")
            return path
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory(dir=folder) as partial:
            if _is_google_drive(url):
                fetched = _download_google_drive(url, Path(partial))
            else:
                fetched = Path(partial) / (Path(urlparse(url).path).name or "download")
                _download_http(url, fetched)
            path = folder / fetched.name
            fsync_and_replace(fetched, path)
    except (OSError, requests.RequestException) as error:
        shutil.rmtree(folder, ignore_errors=True)
        problem = _network_problem(error, url) if isinstance(error, requests.RequestException) else error
        raise PipelineError(f"Could not download {url}: {problem}. {hint}") from None
    record = {"url": url, "size": path.stat().st_size, "sha256": sha256_of_file(path)}
    write_json(path.with_name(path.name + ".download.json"), record)
    return path
