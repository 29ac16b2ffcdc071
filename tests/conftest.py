"""Fixtures: loopback HTTP and S3 servers, test images, a tiny CLIP checkpoint, a fake hub cache.

Nothing here touches the internet: servers listen on 127.0.0.1 and the model is built here.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "notebooks"))
sys.path.insert(0, str(REPO / "benchmarks"))

import lib  # noqa: E402
from workload import embed_rows, loopback_s3  # noqa: E402

IMAGE_COUNT = 40
TINY_IMAGE_SIZE = 32
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    """A smooth random JPEG: gradients plus noise, so resizing and cropping matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (
        rng.uniform(0, 255, 3)
        + (x[..., None] * rng.uniform(-2, 2, 3))
        + (y[..., None] * rng.uniform(-2, 2, 3))
    )
    pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def image_id(index: int) -> str:
    return f"{index:016x}"


@pytest.fixture(scope="session")
def images() -> dict[str, bytes]:
    """IMAGE_COUNT JPEGs keyed by an Open Images-like id, in both orientations and odd shapes."""
    shapes = [(64, 48), (48, 64), (32, 32), (160, 32), (33, 90), (20, 15), (75, 75), (41, 37)]
    return {image_id(i): jpeg_bytes(*shapes[i % len(shapes)], seed=i) for i in range(IMAGE_COUNT)}


# ---------------------------------------------------------------------------------------------
# Loopback HTTP server that can also misbehave
# ---------------------------------------------------------------------------------------------


class LoopbackServer(http.server.ThreadingHTTPServer):
    """Serves `files` (path -> (bytes, content type)) and misbehaves on purpose under some prefixes.

    /status/<code>/...   always answers <code>
    /flaky/...           answers 500 on the first request for a path (query included), then the file
    /busy/<code>/<s>/... answers <code> with "Retry-After: <s>" on the first request, then the file
    /outage/...          answers 503 while `outage` is True, then the file
    /slow/...            waits `slow_seconds` before answering
    /trickle/...         sends the file a few bytes at a time, each within any read timeout
    /truncated/...       announces the full length but sends half of the file
    /huge/...            announces a body of 1 TB
    /html/...            an HTML page with status 200
    /gzip/...            the file gzip-encoded (Content-Encoding: gzip), Content-Length counting the encoding
    /norange/...         the whole file, whatever Range a request asks for
    Elsewhere a request's "Range: bytes=<first>-<last>" is answered 206 with those bytes (416 past the end),
    and a file is sent with its ETag.
    A query string (?copy=3) is ignored when finding the file, so one file can stand for many rows.
    """

    daemon_threads = True
    request_queue_size = 256  # a listen backlog like a real server's, for many concurrent fetches
    slow_seconds = 3.0
    outage = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, tuple[bytes, str]] = {}
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_port}{path}"

    def count(self, path: str) -> int:
        with self._lock:
            self.hits[path] = self.hits.get(path, 0) + 1
            return self.hits[path]


MISBEHAVIOURS = ("flaky", "outage", "slow", "trickle", "truncated", "huge", "gzip", "norange")
NAMED_MISBEHAVIOURS = {"busy": 4}  # prefixes with arguments: the index of the path part where the file begins


class _Handler(http.server.BaseHTTPRequestHandler):
    server: LoopbackServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        attempt = self.server.count(self.path)
        parts = self.path.split("?")[0].split("/")
        if parts[1] == "status":
            return self._send(int(parts[2]), b"error", "text/plain")
        if parts[1] == "html":
            return self._send(200, b"<html><body>Not found</body></html>", "text/html")
        inner = "/" + "/".join(
            parts[NAMED_MISBEHAVIOURS.get(parts[1], 2 if parts[1] in MISBEHAVIOURS else 1) :]
        )
        if inner not in self.server.files:
            return self._send(404, b"not found", "text/plain")
        body, content_type = self.server.files[inner]
        if parts[1] == "flaky" and attempt == 1:
            return self._send(500, b"try again", "text/plain")
        if parts[1] == "busy" and attempt == 1:
            return self._send(int(parts[2]), b"busy", "text/plain", headers={"Retry-After": parts[3]})
        if parts[1] == "outage" and self.server.outage:
            return self._send(503, b"down for maintenance", "text/plain")
        if parts[1] == "slow":
            time.sleep(self.server.slow_seconds)
        if parts[1] == "truncated":
            return self._send(200, body[: len(body) // 2], content_type, length=len(body))
        if parts[1] == "huge":
            return self._send(200, body, content_type, length=10**12)
        if parts[1] == "trickle":
            return self._trickle(body, content_type)
        if parts[1] == "gzip":
            return self._send(200, gzip.compress(body), content_type, headers={"Content-Encoding": "gzip"})
        if self.headers.get("Range") and parts[1] != "norange":
            return self._send_range(body, content_type, self.headers["Range"])
        return self._send(200, body, content_type, headers={"ETag": etag(body)})

    def _send_range(self, body: bytes, content_type: str, ranged: str) -> None:
        first, last = (int(end) for end in ranged.removeprefix("bytes=").split("-"))
        if first >= len(body):
            return self._send(416, b"", content_type, headers={"Content-Range": f"bytes */{len(body)}"})
        part = body[first : last + 1]
        span = f"bytes {first}-{first + len(part) - 1}/{len(body)}"
        return self._send(206, part, content_type, headers={"Content-Range": span, "ETag": etag(body)})

    def _trickle(self, body: bytes, content_type: str) -> None:
        self._send(200, b"", content_type, length=len(body))
        try:
            for low in range(0, len(body), 16):
                self.wfile.write(body[low : low + 16])
                self.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        length: int | None = None,
        headers: dict | None = None,
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(length if length is not None else len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


def etag(body: bytes) -> str:
    """An ETag as servers send one: the body's MD5, quoted."""
    return f'"{hashlib.md5(body).hexdigest()}"'


def closed_port_url(path: str) -> str:
    """A loopback URL on which nothing listens: an unreachable server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def md5_base64(data: bytes) -> str:
    """An MD5 digest as Open Images' OriginalMD5 column writes it."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def official_metadata_csv(images: dict[str, bytes], url_of, subset: str = "validation") -> bytes:
    """A metadata CSV in the official Open Images format (all columns, quoted titles, base64 MD5s)."""
    header = (
        "ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,Author,Title,"
        "OriginalSize,OriginalMD5,Thumbnail300KURL,Rotation\n"
    )
    lines = [
        f"{i},{subset},{url_of(i)},https://www.flickr.com/photos/x/{n}/,"
        f"https://creativecommons.org/licenses/by/2.0/,https://www.flickr.com/people/x/,Author {n},"
        f'"Title, with a comma {n}",{len(images[i])},{md5_base64(images[i])},,{[0, 90, "", 180][n % 4]}\n'
        for n, i in enumerate(sorted(images))
    ]
    return (header + "".join(lines)).encode()


@pytest.fixture(scope="session")
def http_server(images):
    """A loopback HTTP server with every test image under /images/<id>.jpg and metadata files."""
    server = LoopbackServer()
    for key, data in images.items():
        server.files[f"/images/{key}.jpg"] = (data, "image/jpeg")
    ids = sorted(images)
    server.files["/metadata/validation-images-with-rotation.csv"] = (
        official_metadata_csv(images, lambda i: server.url(f"/images/{i}.jpg")),
        "text/csv",
    )
    server.files["/metadata/image_ids.json"] = (json.dumps(ids).encode(), "application/json")
    urls = [server.url(f"/images/{i}.jpg") for i in ids]
    server.files["/metadata/image_urls.json"] = (json.dumps(urls).encode(), "application/json")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


# ---------------------------------------------------------------------------------------------
# Loopback S3 (moto's server mode) with a public bucket laid out like open-images-dataset
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint(images) -> str:
    """The URL of a loopback S3 holding validation/<id>.jpg in a public-read open-images-dataset."""
    objects = {f"validation/{key}.jpg": data for key, data in images.items()}
    server, endpoint = loopback_s3(lib.sources.OPENIMAGES_BUCKET, objects)
    yield endpoint
    server.stop()


# ---------------------------------------------------------------------------------------------
# A tiny CLIP checkpoint with tokenizer and image-processor files, and a hub cache that holds it
# ---------------------------------------------------------------------------------------------


def _tiny_tokenizer():
    """A CLIP BPE tokenizer over single printable characters: enough for short ASCII queries."""
    from transformers import CLIPTokenizer

    characters = [chr(code) for code in range(33, 127)]
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=[])


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised CLIPModel (32 px, 16-d embeddings) saved like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = _tiny_tokenizer()
    specials = {
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={**layers, **specials, "vocab_size": len(tokenizer), "max_position_embeddings": 77},
        vision_config={**layers, "image_size": TINY_IMAGE_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def retrained(checkpoint: Path, folder: Path, seed: int) -> Path:
    """`checkpoint`'s files with other weights of the same shape in `folder`: another revision of it."""
    from transformers import CLIPModel

    shutil.copytree(checkpoint, folder)
    torch.manual_seed(seed)
    CLIPModel(CLIPModel.from_pretrained(checkpoint).config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hub_cache(tiny_checkpoint, tmp_path_factory) -> Path:
    """A Hugging Face hub cache in which openai/clip-vit-base-patch32 is the tiny checkpoint."""
    cache = tmp_path_factory.mktemp("hf-hub")
    repo = cache / "models--openai--clip-vit-base-patch32"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / FAKE_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """In this process, the hub is offline and its cache is `hub_cache`."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


@pytest.fixture(scope="session")
def openai_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One small random CLIP from OpenAI's own model code, in each form clip.load reads (form -> file)."""
    from reference import OPENAI_FORMS, openai_clip_model, save_openai_checkpoint

    folder = tmp_path_factory.mktemp("openai-clip")
    model = openai_clip_model()
    paths = {form: folder / f"{form.replace(' ', '-')}.pt" for form in OPENAI_FORMS}
    for form, path in paths.items():
        save_openai_checkpoint(model, path, form)
    return paths


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint):
    return lib.load_encoder(str(tiny_checkpoint), "cpu", "fp32")


def read_output(path: Path) -> dict:
    """A chunk or merged file as plain Python: its datasets (urls left as bytes) and attributes."""
    with h5py.File(path, "r") as file:
        return {
            "rows": file["rows"][:].tolist(),
            "image_ids": file["image_ids"].asstr()[:].tolist(),
            "urls": file["urls"][:].tolist(),
            "embeddings": file["embeddings"][:],
            "failed_rows": file["failed/rows"][:].tolist(),
            "failed_ids": file["failed/image_ids"].asstr()[:].tolist(),
            "reasons": file["failed/reasons"].asstr()[:].tolist(),
            "attrs": {key: lib.chunkfile.attribute_value(value) for key, value in file.attrs.items()},
        }


def merged_output(collection: lib.workspace.Collection) -> dict:
    """03's merged file of the collection, without what differs between any two runs (chunk timings)."""
    output = read_output(lib.merge_chunks(collection).path)
    return {**output, "attrs": {key: value for key, value in output["attrs"].items() if key != "stats"}}


def assert_same_output(first: dict, second: dict) -> None:
    """Two outputs of read_output hold the same records, bit for bit."""
    np.testing.assert_array_equal(first["embeddings"], second["embeddings"])
    assert {**first, "embeddings": None} == {**second, "embeddings": None}


# ---------------------------------------------------------------------------------------------
# A workspace of its own for each test, and 01 and 02 run in it
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def configure() -> Iterator[Callable]:
    """lib.configure for one test: the settings it changes are restored after it."""
    with lib.settings.configured():
        yield lib.configure


@pytest.fixture
def workspace(tmp_path, configure) -> lib.workspace.Workspace:
    """lib's repository root under a temporary folder, so tests never touch the repository's files."""
    configure(root=tmp_path / "repo")
    space = lib.workspace.current_workspace()
    space.root.mkdir()
    return space


@pytest.fixture
def collection(workspace) -> lib.workspace.Collection:
    """The default collection, OUTPUT/, of the test's own repository root."""
    return lib.collection()


@pytest.fixture
def fast_retries(configure):
    """The same retry policy without the backoff sleeps, so failure tests run quickly."""
    configure(retry_backoff=0)


BROKEN = {"broken.jpg": jpeg_bytes(64, 48, seed=9)[:400], "page.png": b"<html>oops</html>"}


def folder_of_images(folder: Path, images: dict[str, bytes], count: int) -> Path:
    """A new folder holding the first `count` test images as <id>.jpg."""
    folder.mkdir()
    for key, data in list(images.items())[:count]:
        (folder / f"{key}.jpg").write_bytes(data)
    return folder


@pytest.fixture
def image_folder(tmp_path, images):
    """18 test images and two broken files in a folder."""
    folder = folder_of_images(tmp_path / "images", images, 18)
    for name, data in BROKEN.items():
        (folder / name).write_bytes(data)
    return folder


def save_table(params: lib.MetadataParams, collection: lib.workspace.Collection) -> lib.table.ImageTable:
    """Build, save and load an image table as 01 and 02 do."""
    lib.save_image_table(lib.build_image_table(params), params, collection)
    return lib.load_image_table(collection)


@pytest.fixture
def table(collection, image_folder) -> lib.table.ImageTable:
    """The image table of `image_folder`, saved in the test's collection as 01 would."""
    return save_table(lib.MetadataParams("folder", "validation", str(image_folder), "s3"), collection)


def search_values(**overrides) -> dict:
    """04's parameters (as SearchParams takes them) for the CPU, with no queries and no export."""
    values = dict(
        embeddings=None,
        queries=[],
        image_query=None,
        top_k=10,
        index="exact",
        model=None,
        device="cpu",
        export=None,
        pca_dim=None,
        s3_endpoint_url=None,
    )
    return {**values, **overrides}


def embed_params(**overrides) -> lib.EmbedParams:
    """02's parameters for the tiny model on the CPU, with small chunks and batches."""
    values = dict(
        start=0,
        end=None,
        chunk=8,
        gpu_batch_size=3,
        num_workers=4,
        model="tiny",
        model_revision=None,
        device="cpu",
        precision="fp32",
        preprocess="exact",
        exif_transpose=False,
        apply_rotation=False,
        max_pixels=lib.preprocess.DEFAULT_MAX_PIXELS,
        s3_endpoint_url=None,
        retry_failed=False,
        stop_if_unreachable=True,
    )
    return lib.EmbedParams(**{**values, **overrides})


def run_signature(encoder, table, **overrides) -> dict:
    """The signature 02 would plan with, for these parameters."""
    params = embed_params(**overrides)
    return lib.plan.run_signature(
        encoder, lib.plan.image_recipe(encoder, params), table, params.storage_dtype
    )


def run_embed(table, encoder, **overrides) -> lib.executor.RunSummary:
    """Plan and embed as 02 does, in the collection of OUTPUT_DIR (default OUTPUT/)."""
    return embed_rows(table, encoder, embed_params(**overrides))


# ---------------------------------------------------------------------------------------------
# The stage notebooks, run by papermill in a copy of the repository
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path) -> Path:
    """A copy of the repository's notebooks and their lib package."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture
def kernel_env(hub_cache) -> dict:
    """The environment of the papermill and nbval kernels: this Python, an offline hub cache."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    env.pop("AWS_ENDPOINT_URL_S3", None)
    return env


HOLD_LOCK = """
import sys, time
from pathlib import Path
import conftest, lib
lib.claims.FileLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
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
def merged(table, tiny_encoder, collection) -> lib.nearest.EmbeddingsFile:
    run_embed(table, tiny_encoder)
    return lib.open_embeddings(collection, lib.merge_chunks(collection, "OUTPUT/Images_Embedded.h5").path)


def metadata(dataset, source=None, split="validation", fetch="s3"):
    return lib.MetadataParams(dataset, split, source, fetch)


ROWS = [{"image_id": "007", "url": "http://example.com/a.jpg"}, {"image_id": "8", "url": "img/b.png"}]
