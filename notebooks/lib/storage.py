"""Collections on object storage: an OUTPUT_DIR that is a URL (s3://bucket/prefix, or another fsspec one).

A remote collection is staged in .cache/collections/: the stages work on the staged copy as on a
local OUTPUT_DIR, bring what they read from the store first (`pull`, `sync_chunks`) and upload each
file they write whole, once it is complete (`push`). Object storage has no flock: a lease object
keeps one 02 or 03 at a time on a collection (`lease`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ParameterError, PipelineError, first_line
from .workspace import Collection, fsync_and_replace, read_json, temporary_path, write_json

LEASE_NAME = ".lease.json"
LEASE_SECONDS = 120.0  # a lease not renewed for this long is a dead run's, which the next run takes over
_BACKENDS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
CREDENTIAL_SOURCES = (
    "AWS_PROFILE, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or an instance or "
    "container role"
)


def check_store_url(url: str) -> None:
    """A ParameterError unless `url` names a writable fsspec filesystem whose library is installed."""
    import fsspec

    protocol = urlparse(url).scheme
    if protocol in ("http", "https"):
        raise ParameterError(
            f"OUTPUT_DIR={url!r} is not allowed: a web server cannot be written to. Use a folder, or an "
            "object-storage URL such as 's3://bucket/prefix'."
        )
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        package = _BACKENDS.get(protocol, f"the fsspec library for {protocol}://")
        raise ParameterError(f"OUTPUT_DIR={url!r} needs {package}: pip install {package}.") from None
    except ValueError:
        raise ParameterError(
            f"OUTPUT_DIR={url!r} is not allowed: fsspec knows no {protocol}:// filesystem. Use a folder, "
            "or an object-storage URL such as 's3://bucket/prefix'."
        ) from None


@dataclasses.dataclass(frozen=True)
class ObjectStore:
    """The object-storage folder of a remote collection, reached through fsspec (s3fs for s3://)."""

    url: str
    endpoint_url: str | None = None  # S3_ENDPOINT_URL; None: the AWS variables and boto's own default

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, one per endpoint and credentials in the environment; S3 is signed."""
        return filesystem(urlparse(self.url).scheme, self.endpoint_url)

    def key(self, name: str) -> str:
        return f"{self.url}/{name}"

    def info(self, name: str) -> dict | None:
        """The object's size and ETag (None: there is no such object)."""
        with self._errors("read"):
            self.fs.invalidate_cache(self.key(name))
            try:
                found = self.fs.info(self.key(name))
            except FileNotFoundError:
                return None
        return _identity(found)

    def listing(self, folder: str, pattern: str) -> dict[str, dict]:
        """Object name (relative to the collection) -> its size and ETag, for names matching `pattern`."""
        with self._errors("list"):
            self.fs.invalidate_cache(self.key(folder))
            found = self.fs.glob(self.key(f"{folder}/{pattern}"), detail=True)
        root = self.key("").split("://", 1)[-1]
        return {name.split("://", 1)[-1].removeprefix(root): _identity(item) for name, item in found.items()}

    def upload(self, local: Path, name: str) -> dict:
        """Put a whole local file at `name`: readers see the old object or the new one, never a part."""
        with self._errors("write"):
            self.fs.put_file(str(local), self.key(name))
        return self.info(name) or {}

    def download(self, name: str, local: Path) -> None:
        """Get the object `name` into `local`, whole or not at all."""
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = temporary_path(local)
        try:
            with self._errors("read"):
                self.fs.get_file(self.key(name), str(partial))
            fsync_and_replace(partial, local)
        finally:
            partial.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        with self._errors("delete"), contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.key(name))

    def create(self, name: str, data: bytes) -> bool:
        """Write `data` at `name` unless an object is there (S3's conditional write); False if one is."""
        with self._errors("write"):
            try:
                self.fs.pipe_file(self.key(name), data, mode="create")
            except FileExistsError:
                return False
            except TypeError:
                raise PipelineError(
                    f"OUTPUT_DIR={self.url!r}: its filesystem cannot write an object only where there is "
                    "none, which the collection's lease needs: use an s3:// URL or a folder."
                ) from None
        return True

    def replace(self, name: str, data: bytes) -> None:
        with self._errors("write"):
            self.fs.pipe_file(self.key(name), data)

    def read(self, name: str) -> bytes | None:
        with self._errors("read"):
            try:
                return self.fs.cat_file(self.key(name))
            except FileNotFoundError:
                return None

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """A store's failure as what the user can fix, with the URL and how this machine asked."""
        try:
            yield
        except FileNotFoundError as error:
            if "bucket" not in str(error).lower():
                raise
            raise PipelineError(
                f"Cannot {action} {self.url}: there is no such bucket at "
                f"{self.endpoint_url or 'the default endpoint'}. Create it, or check OUTPUT_DIR and "
                "S3_ENDPOINT_URL."
            ) from None
        except Exception as error:
            if not _store_failure(error):
                raise
            if isinstance(error, PermissionError) or type(error).__name__ == "NoCredentialsError":
                raise PipelineError(
                    f"Cannot {action} {self.url}: the store refuses this machine, which asked "
                    f"{describe_aws_credentials()}. Give it credentials that may {action} there "
                    f"({CREDENTIAL_SOURCES})."
                ) from None
            raise PipelineError(
                f"Cannot {action} {self.url} ({first_line(error)}): check the network, S3_ENDPOINT_URL "
                "and the credentials, then run this stage again."
            ) from None


def _identity(found: dict) -> dict:
    """What tells one version of an object from another: its size and ETag."""
    return {"size": found.get("size"), "etag": found.get("ETag") or found.get("etag")}


def _store_failure(error: Exception) -> bool:
    """Whether an error is the store's (the network, the service, botocore), not a bug of this code."""
    return isinstance(error, OSError) or type(error).__module__.startswith(("botocore", "aiobotocore"))


_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def filesystem(protocol: str, endpoint_url: str | None) -> Any:
    """The fsspec filesystem of `protocol`, one per endpoint and credentials in the environment."""
    credentials = tuple(os.environ.get(name) for name in _CREDENTIAL_VARIABLES)
    return _filesystem(protocol, endpoint_url, credentials)


@functools.lru_cache(maxsize=8)
def _filesystem(protocol: str, endpoint_url: str | None, credentials: tuple) -> Any:
    """A filesystem of its own (not fsspec's shared one): credentials set later make a new one."""
    import fsspec

    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if protocol == "s3" and endpoint_url else {}
    return fsspec.filesystem(protocol, skip_instance_cache=True, **options)


def describe_aws_credentials(session: Any = None) -> str:
    """How boto3's default chain signs requests here: with which credentials, or anonymously."""
    import boto3

    session = session or boto3.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        return f"anonymously, as no AWS credentials were found ({CREDENTIAL_SOURCES})"
    named = f" (profile {session.profile_name!r})" if credentials.method == "shared-credentials-file" else ""
    return f"with the AWS credentials of {credentials.method}{named}"


def store_of(collection: Collection) -> ObjectStore | None:
    """The collection's object store, or None for a collection in a local folder."""
    return ObjectStore(collection.remote, collection.endpoint_url) if collection.remote else None


def _record(path: Path) -> Path:
    """Where the staged copy `path` records the object it mirrors, and its own size and mtime then."""
    return path.with_name(path.name + ".remote.json")


def _staged(path: Path) -> list[int]:
    found = path.stat()
    return [found.st_size, found.st_mtime_ns]


def pull(collection: Collection, path: Path, found: dict | None = None) -> bool:
    """Bring the object of the staged path `path` into it, if it changed; False: the store has none.

    `found`: the object's size and ETag, where a listing gave them. A staged file rewritten here since
    its object was uploaded (a RETRY_FAILED, or a new table, that a kill stopped before its upload) is
    newer than the object: it is uploaded instead.
    """
    store = store_of(collection)
    if store is None:
        return path.exists()
    name = path.relative_to(collection.folder).as_posix()
    found = found or store.info(name)
    if found is None:
        return False
    record = read_json(_record(path))
    if path.is_file() and record.get("object") == found:
        if record.get("staged") != _staged(path):
            push(collection, path)
        return True
    store.download(name, path)
    write_json(_record(path), {"object": found, "staged": _staged(path)})
    return True


def push(collection: Collection, path: Path) -> None:
    """Upload the staged file `path` whole to the collection's store; nothing for a local collection."""
    store = store_of(collection)
    if store is not None:
        found = store.upload(path, path.relative_to(collection.folder).as_posix())
        write_json(_record(path), {"object": found, "staged": _staged(path)})


def sync_chunks(collection: Collection) -> None:
    """Make the staged chunk folder mirror the store's: new chunks fetched, deleted ones dropped.

    A staged chunk the store never had (a run stopped between writing it and uploading it) is
    uploaded: it is whole, and its rows are done.
    """
    store = store_of(collection)
    if store is None:
        return
    remote = store.listing("chunks", "chunk_*.h5")
    for name, found in remote.items():
        pull(collection, collection.folder / name, found)
    for path in collection.chunks.glob("chunk_*.h5"):
        name = path.relative_to(collection.folder).as_posix()
        if name in remote:
            continue
        if _record(path).exists():  # it was uploaded, and has gone from the store since (CLEANUP)
            path.unlink()
            _record(path).unlink()
        else:
            push(collection, path)


def delete_chunks(collection: Collection, names: list[str]) -> None:
    """Delete the named chunk files from the collection's store (03's CLEANUP)."""
    store = store_of(collection)
    for name in names if store else []:
        store.delete(f"chunks/{name}")
        _record(collection.chunks / name).unlink(missing_ok=True)


@contextlib.contextmanager
def lease(collection: Collection, stage: str) -> Iterator[None]:
    """Hold the collection's lease while the block runs: another 02 or 03 on it is refused meanwhile.

    The lease object names its holder and an expiry that a thread renews; a run that died leaves
    a lease that expires within LEASE_SECONDS, and the next run takes it over. A local collection
    needs none: its files are claimed with flock.
    """
    store = store_of(collection)
    if store is None:
        yield
        return
    held = _Lease(store, stage)
    held.acquire()
    try:
        yield
    finally:
        held.release()


class _Lease:
    """One run's lease on a remote collection, renewed every quarter of LEASE_SECONDS."""

    def __init__(self, store: ObjectStore, stage: str):
        self._store = store
        self._record = {"owner": f"pid {os.getpid()} on {socket.gethostname()}", "stage": stage}
        self._token = uuid.uuid4().hex
        self._stopped = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="lease", daemon=True)

    def _data(self) -> bytes:
        return json.dumps(
            {**self._record, "token": self._token, "expires": time.time() + LEASE_SECONDS}
        ).encode()

    def acquire(self) -> None:
        if not self._store.create(LEASE_NAME, self._data()):
            current = self._current()
            if current.get("expires", 0) > time.time():
                holder = f"{current.get('stage')} ({current.get('owner')})"
                until = time.ctime(current["expires"])
                raise PipelineError(
                    f"{self._store.url} is in use by {holder} until at least {until}, "
                    "and object storage lets one run write a collection at a time: wait for it to finish, or "
                    f"give this run another OUTPUT_DIR. A run that died leaves a lease that expires within "
                    f"{LEASE_SECONDS:.0f} s."
                )
            self._store.delete(LEASE_NAME)  # a dead run's: taken over
            if not self._store.create(LEASE_NAME, self._data()):
                raise PipelineError(
                    f"Another run took the lease of {self._store.url} just now: run this again."
                )
        self._renewer.start()

    def _current(self) -> dict:
        data = self._store.read(LEASE_NAME)
        try:
            return json.loads(data) if data else {}
        except ValueError:
            return {}

    def _renew(self) -> None:
        while not self._stopped.wait(LEASE_SECONDS / 4):
            with contextlib.suppress(PipelineError):  # renewed at the next turn, well before it expires
                if self._current().get("token") != self._token:
                    print(
                        f"WARNING: the lease of {self._store.url} was taken over by another run while this "
                        f"one did not renew it for {LEASE_SECONDS:.0f} s (a paused or cut-off machine): "
                        "stop one of them; the chunks of both are whole, and 03 refuses overlaps."
                    )
                    return
                self._store.replace(LEASE_NAME, self._data())

    def release(self) -> None:
        self._stopped.set()
        if self._renewer.is_alive():
            self._renewer.join()
        if self._current().get("token") == self._token:
            self._store.delete(LEASE_NAME)
