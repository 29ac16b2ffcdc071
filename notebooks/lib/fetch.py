"""02's first step per image: the bytes at a location, from S3, HTTP(S), another fsspec store or disk.

Retries, timeouts, a deadline and a size limit bound every fetch; what still fails raises
ImageFailure with a stable reason ('http 404', 'timeout', 's3 NoSuchKey'). S3 is read anonymously
from Open Images' public bucket (or with S3_ANONYMOUS), with boto3's default credentials elsewhere.
A location '<object>#bytes=<first>-<last>' is a byte range of an object (an image inside a WebDataset
shard), read with a range request; 01 reads whole shards through the same fetcher (`Fetcher.stream`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any
from urllib.parse import urlparse

import requests
import urllib3

from .downloads import DeadlineRetry, PastDeadline, http_session, root_cause
from .errors import ImageFailure
from .settings import current_settings
from .storage import describe_aws_credentials, filesystem

MAX_IMAGE_BYTES = 512 << 20  # a larger body is not an image to embed ("too large"), and is not read
OPENIMAGES_BUCKET = "open-images-dataset"
PUBLIC_BUCKETS = (OPENIMAGES_BUCKET,)  # read anonymously, as Open Images' own downloader.py does
MISSING_REASONS = ("file not found", "http 404", "s3 NoSuchKey")  # the reasons of an object that is not there
_WHOLE_BYTES = {"Accept-Encoding": "identity"}  # offsets in a shard are of its bytes as stored
_BYTE_RANGE = re.compile(r"(?P<object>.+)#bytes=(?P<first>\d+)-(?P<last>\d+)")
_S3_REASONS = {"403": "s3 AccessDenied", "Forbidden": "s3 AccessDenied", "InvalidRange": "truncated member"}


def member_location(shard: str, offset: int, size: int) -> str:
    """The location of the `size` bytes at `offset` of `shard`: '<shard>#bytes=<first>-<last>'."""
    return f"{shard}#bytes={offset}-{offset + size - 1}"


def byte_range(location: str) -> tuple[str, tuple[int, int] | None]:
    """The object a location names, and the (offset, size) of its bytes that it means (None: all)."""
    member = _BYTE_RANGE.fullmatch(location)
    if member is None:
        return location, None
    first, last = int(member["first"]), int(member["last"])
    return member["object"], (first, last - first + 1)


def _range_header(span: tuple[int, int]) -> str:
    return f"bytes={span[0]}-{span[0] + span[1] - 1}"


class Fetcher:
    """Bytes of images from S3, HTTP(S) or files.

    S3 reads of the public Open Images bucket, or of any bucket with `s3_anonymous`, are unsigned, as
    Open Images' downloader.py makes them; other buckets are read with boto3's default credentials
    (AWS_PROFILE, AWS_* variables, ~/.aws, a role), anonymously where there are none. Transient
    failures are retried by the libraries' own mechanisms (botocore's retry modes, urllib3's Retry).
    Every request has timeouts, every body a deadline and a size limit; what still fails raises
    ImageFailure with a stable reason.
    """

    def __init__(
        self,
        s3_endpoint_url: str | None = None,
        pool_size: int = 10,
        timeout: tuple[float, float] | None = None,
        deadline: float | None = None,
        max_bytes: int | None = None,
        s3_anonymous: bool = False,
    ):
        """None: the configured http_timeout and fetch_deadline, and MAX_IMAGE_BYTES."""
        settings = current_settings()
        self._timeout = timeout or settings.http_timeout
        self._deadline = deadline or settings.fetch_deadline
        self._max_bytes = max_bytes or MAX_IMAGE_BYTES
        self._http = http_session(pool_size)
        self._s3_endpoint_url = s3_endpoint_url
        self._s3_anonymous = s3_anonymous
        self._pool_size = pool_size
        self._s3_client_lock = threading.Lock()

    def s3_access(self, bucket: str) -> str:
        """How this fetcher reads `bucket`: anonymously (and why), or with which credentials."""
        if self._s3_anonymous:
            return "anonymously (S3_ANONYMOUS=True)"
        if bucket in PUBLIC_BUCKETS:
            return "anonymously (Open Images' public bucket)"
        with self._s3_client_lock:
            return describe_aws_credentials(self._s3_session)

    @functools.cached_property
    def _s3_session(self) -> Any:
        import boto3

        return boto3.session.Session()

    @functools.cached_property
    def _s3_credentials(self) -> Any:
        """What boto3's default chain finds, looked up at the first private bucket; None: nothing."""
        return self._s3_session.get_credentials()

    def _s3_client(self, bucket: str) -> Any:
        """The client for `bucket`: unsigned, or signed with the default credentials where it needs them."""
        with self._s3_client_lock:  # the first S3 fetches wait for one client rather than each make one
            if self._s3_anonymous or bucket in PUBLIC_BUCKETS or self._s3_credentials is None:
                return self._unsigned_s3
            return self._signed_s3

    @functools.cached_property
    def _unsigned_s3(self) -> Any:
        import botocore

        return self._make_s3_client(botocore.UNSIGNED)

    @functools.cached_property
    def _signed_s3(self) -> Any:
        return self._make_s3_client(None)

    def _make_s3_client(self, signature_version: Any) -> Any:
        """An S3 client, unsigned or signed (None), made when first needed: boto3 takes a while to load."""
        import botocore.config

        session = self._s3_session
        return session.client(
            "s3",
            endpoint_url=self._s3_endpoint_url,
            region_name=session.region_name or "us-east-1",
            config=botocore.config.Config(
                signature_version=signature_version,
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=self._timeout[0],
                read_timeout=self._timeout[1],
                max_pool_connections=self._pool_size,
            ),
        )

    def fetch(self, location: str) -> bytes:
        """The bytes at `location`: s3://bucket/key, http(s)://..., another fsspec URL, file://... or a path.

        A location ending in '#bytes=<first>-<last>' is that range of the object; a range that the
        object ends inside fails as "truncated member".
        """
        where, span = byte_range(location)
        if span and not span[1]:
            raise ImageFailure("empty body")
        if span and span[1] > self._max_bytes:
            raise ImageFailure("too large")
        parsed = urlparse(where)
        if parsed.scheme == "s3":
            data = self._fetch_s3(parsed.netloc, parsed.path.lstrip("/"), span)
        elif parsed.scheme in ("http", "https"):
            data = self._fetch_http(where, span)
        elif _is_fsspec_url(parsed.scheme):
            data = self._fetch_fsspec(where, span)
        else:
            data = self._fetch_file(parsed.path if parsed.scheme == "file" else where, span)
        if span and len(data) != span[1]:
            raise ImageFailure("truncated member" if len(data) < span[1] else "range ignored")
        if not data:
            raise ImageFailure("empty body")
        return data

    @contextlib.contextmanager
    def stream(self, location: str) -> Iterator[tuple[IO[bytes], dict]]:
        """The whole object at `location`, read as it arrives (no deadline, no size limit), and its version.

        The version is what tells this object from a changed one: its size and ETag, Last-Modified or
        mtime. What cannot be opened raises ImageFailure with the reason a fetch would give.
        """
        parsed = urlparse(location)
        if parsed.scheme == "s3":
            bucket, key = parsed.netloc, parsed.path.lstrip("/")
            with self._s3_failures():
                reply = self._s3_client(bucket).get_object(Bucket=bucket, Key=key)
                with contextlib.closing(reply["Body"]) as body:
                    yield body, {"size": reply.get("ContentLength"), "etag": reply.get("ETag")}
        elif parsed.scheme in ("http", "https"):
            with (
                self._http_failures(),
                self._http.get(location, timeout=self._timeout, stream=True, headers=_WHOLE_BYTES) as reply,
            ):
                if reply.status_code != 200:
                    raise ImageFailure(f"http {reply.status_code}")
                headers = reply.headers
                version = {"size": headers.get("Content-Length"), "etag": headers.get("ETag")}
                yield reply.raw, {**version, "modified": headers.get("Last-Modified")}
        elif _is_fsspec_url(parsed.scheme):
            fs = filesystem(parsed.scheme, None)
            # around the open only: around the reads it would take the reader's errors for the store's
            with self._fsspec_failures():
                version = {"version": fs.ukey(location)}  # a digest of the object's info, its size included
                opened = fs.open(location, "rb")
            with opened:
                yield opened, version
        else:
            path = parsed.path if parsed.scheme == "file" else location
            with self._file_failures(), open(path, "rb") as opened:
                found = os.fstat(opened.fileno())
                yield opened, {"size": found.st_size, "mtime_ns": found.st_mtime_ns}

    def _read_body(self, blocks: Iterable[bytes], announced: int | None, began: float) -> bytes:
        """A response body read block by block, within the deadline and the size limit."""
        if announced is not None and announced > self._max_bytes:
            raise ImageFailure("too large")
        body, size = [], 0
        for block in blocks:
            size += len(block)
            if size > self._max_bytes:
                raise ImageFailure("too large")
            if time.monotonic() - began > self._deadline:
                raise ImageFailure("timeout")
            body.append(block)
        return b"".join(body)

    def _fetch_s3(self, bucket: str, key: str, span: tuple[int, int] | None) -> bytes:
        client = self._s3_client(bucket)
        began = time.monotonic()
        ranged = {"Range": _range_header(span)} if span else {}
        with self._s3_failures():
            reply = client.get_object(Bucket=bucket, Key=key, **ranged)
            with contextlib.closing(reply["Body"]) as body:
                if span and not _holds_range(reply.get("ContentRange"), span):
                    raise ImageFailure("range ignored")  # the whole object, which may be a shard of gigabytes
                return self._read_body(body.iter_chunks(1 << 16), reply.get("ContentLength"), began)

    @staticmethod
    @contextlib.contextmanager
    def _s3_failures() -> Iterator[None]:
        """botocore's errors as ImageFailure reasons."""
        import botocore.exceptions

        try:
            yield
        except botocore.exceptions.ClientError as error:
            code = error.response["Error"]["Code"]
            raise ImageFailure(_S3_REASONS.get(code, f"s3 {code}")) from None
        except (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError):
            raise ImageFailure("timeout") from None
        except (botocore.exceptions.IncompleteReadError, urllib3.exceptions.ProtocolError):
            raise ImageFailure("truncated body") from None
        except botocore.exceptions.BotoCoreError as error:
            unresolved = (urllib3.exceptions.NameResolutionError, socket.gaierror)
            resolved = not isinstance(getattr(error, "kwargs", {}).get("error"), unresolved)
            raise ImageFailure("connection error" if resolved else "cannot resolve") from None

    def _fetch_http(self, url: str, span: tuple[int, int] | None) -> bytes:
        began = time.monotonic()
        DeadlineRetry.deadlines.at = began + self._deadline  # retries and their waits count too
        headers = {"Range": _range_header(span), **_WHOLE_BYTES} if span else {}
        try:
            with (
                self._http_failures(),
                self._http.get(url, timeout=self._timeout, stream=True, headers=headers) as reply,
            ):
                if reply.status_code == 416:
                    raise ImageFailure("truncated member")
                ranged_reply = reply.status_code in (200, 206)
                if span and ranged_reply and not _holds_range(reply.headers.get("Content-Range"), span):
                    raise ImageFailure("range ignored")  # the whole object, which may be a shard of gigabytes
                if reply.status_code != (206 if span else 200):
                    raise ImageFailure(f"http {reply.status_code}")
                announced = reply.headers.get("Content-Length")
                announced = int(announced) if announced and announced.isdigit() else None
                # read1 returns what has arrived, so a body that trickles in meets the deadline
                blocks = iter(functools.partial(reply.raw.read1, 1 << 16, decode_content=True), b"")
                return self._read_body(blocks, announced, began)
        finally:
            DeadlineRetry.deadlines.at = None

    @staticmethod
    @contextlib.contextmanager
    def _http_failures() -> Iterator[None]:
        """requests' and urllib3's errors as ImageFailure reasons."""
        try:
            yield
        except (requests.Timeout, urllib3.exceptions.ReadTimeoutError):
            raise ImageFailure("timeout") from None
        except (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError):
            raise ImageFailure("truncated body") from None
        except requests.ConnectionError as error:
            # a read timeout mid-body, or after the last retry, arrives as a ConnectionError
            cause = root_cause(error)
            if isinstance(cause, urllib3.exceptions.NameResolutionError):
                raise ImageFailure("cannot resolve") from None
            timed_out = isinstance(cause, urllib3.exceptions.ReadTimeoutError)
            raise ImageFailure("timeout" if timed_out else "connection error") from None
        except requests.RequestException as error:
            raise ImageFailure(f"http error: {type(error).__name__}") from None
        except PastDeadline as past:
            raise ImageFailure(f"http {past.status}" if past.status else "timeout") from None

    def _fetch_fsspec(self, url: str, span: tuple[int, int] | None) -> bytes:
        """An object of another fsspec store (gs://, az://, ...), whole or a range of it."""
        with self._fsspec_failures():
            fs = filesystem(urlparse(url).scheme, None)
            if span:
                return fs.cat_file(url, start=span[0], end=span[0] + span[1])
            if fs.size(url) > self._max_bytes:
                raise ImageFailure("too large")
            return fs.cat_file(url)

    @staticmethod
    @contextlib.contextmanager
    def _fsspec_failures() -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise ImageFailure("file not found") from None
        except ImageFailure:
            raise
        except Exception as error:  # each fsspec library raises its own
            raise ImageFailure(f"store error: {type(error).__name__}") from None

    def _fetch_file(self, path: str, span: tuple[int, int] | None) -> bytes:
        with self._file_failures(), open(path, "rb") as file:
            if span:
                file.seek(span[0])
                return file.read(span[1])
            if os.fstat(file.fileno()).st_size > self._max_bytes:
                raise ImageFailure("too large")
            return file.read()

    @staticmethod
    @contextlib.contextmanager
    def _file_failures() -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise ImageFailure("file not found") from None
        except OSError as error:
            raise ImageFailure(f"file unreadable: {error.strerror or type(error).__name__}") from None


def _holds_range(content_range: str | None, span: tuple[int, int]) -> bool:
    """Whether a reply's Content-Range starts at the range's offset (a whole object's reply has none)."""
    return str(content_range or "").startswith(f"bytes {span[0]}-")


_OWN_SCHEMES = ("", "file", "s3", "http", "https")


def _is_fsspec_url(scheme: str) -> bool:
    """Whether a URL of this scheme is another fsspec store's (gs://, az://), not a path (C:\\...)."""
    if scheme in _OWN_SCHEMES or len(scheme) == 1:
        return False
    import fsspec

    return scheme in fsspec.available_protocols()
