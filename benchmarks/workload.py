"""What the benchmarks run on: synthetic photos, a ViT-B/32-shaped model, and lib on the path.

Images are synthetic 1024x768 JPEGs at quality 90, the size of Open Images' S3 copies. The model is
a randomly initialised CLIPModel with `CLIPConfig()` defaults (ViT-B/32's shape, hence its cost),
saved once under .cache/benchmarks/ and loaded through lib like any local checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "notebooks"))

import lib  # noqa: E402

CACHE = REPO / ".cache" / "benchmarks"
MODEL_HELP = "'random' (a random model of ViT-B/32's shape), 'random-small', or MODEL as 02 takes it"


def synthetic_jpeg(seed: int, width: int = 1024, height: int = 768, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth colour gradients, a few flat shapes, and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = (
        rng.uniform(0, 255, 3)
        + x[..., None] * rng.uniform(-0.2, 0.2, 3)
        + y[..., None] * rng.uniform(-0.2, 0.2, 3)
    )
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(30, 250)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        pixels[inside] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 6, pixels.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def synthetic_images(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct synthetic JPEGs."""
    return [synthetic_jpeg(seed + index) for index in range(count)]


def photo_folder(count: int, width: int = 1024, height: int = 768) -> Path:
    """A folder of `count` synthetic photos, written once under .cache/benchmarks/ by all cores."""
    folder = CACHE / f"photos-{width}x{height}-{count}"
    if len(list(folder.glob("*.jpg"))) != count:
        folder.mkdir(parents=True, exist_ok=True)
        write = functools.partial(_write_photo, folder, width, height)
        with ProcessPoolExecutor(
            lib.settings.cpu_cores(), mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            list(pool.map(write, range(count), chunksize=16))
    return folder


def _write_photo(folder: Path, width: int, height: int, index: int) -> None:
    (folder / f"{index:06d}.jpg").write_bytes(synthetic_jpeg(index, width, height))


def location_table(locations: list[str]) -> lib.table.ImageTable:
    """An image table of these locations (paths or URLs), ids their positions, as 01 would make it."""
    import pyarrow as pa

    ids = [str(index) for index in range(len(locations))]
    columns = {"image_id": ids, "url": locations, "location": locations}
    columns |= {"rotation": [None] * len(ids), "md5": [""] * len(ids)}
    return lib.table.ImageTable(pa.table(columns), {"sha256": "benchmark"})


def webdataset_tar(samples: dict[str, dict[str, bytes]]) -> bytes:
    """A tar of samples (key -> extension -> bytes) as WebDataset writes one: <key>.<extension>, by sample."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for key, members in samples.items():
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


SMALL_LAYERS = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2}


def random_clip(name: str, cache: Path = CACHE) -> Path:
    """A randomly initialised CLIPModel (seed 0), saved once under `cache`.

    'random-vit-b-32' has ViT-B/32's shape and cost; 'random-small' has its input and embedding
    sizes but a tiny transformer, for measuring what does not depend on the model (memory).
    """
    folder = cache / name
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import CLIPConfig, CLIPModel

    small = {"text_config": SMALL_LAYERS, "vision_config": {**SMALL_LAYERS, "patch_size": 32}}
    config = {"random-vit-b-32": CLIPConfig(), "random-small": CLIPConfig(**small)}[name]
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = {
        "image_mean": list(lib.preprocess.OPENAI_MEAN),
        "image_std": list(lib.preprocess.OPENAI_STD),
        "crop_size": 224,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


@contextlib.contextmanager
def temporary_workspace() -> Iterator[lib.workspace.Workspace]:
    """lib's repository root (its .cache/ and OUTPUT/) in a temporary folder for the duration."""
    with tempfile.TemporaryDirectory() as root, lib.settings.configured(root=Path(root)):
        yield lib.workspace.current_workspace()


def embed_rows(
    table: lib.table.ImageTable, encoder: lib.model.ClipEncoder, params: lib.EmbedParams
) -> lib.executor.RunSummary:
    """Plan and embed rows [START, END) of `table` as 02 does, in the collection of OUTPUT_DIR."""
    plan = lib.plan_run(params, lib.collection(params.output_dir, params.s3_endpoint_url), encoder, table)
    return lib.embed_chunks(table, encoder, plan, params)


def merged_layout(path: Path, rows: int, dimension: int = 16) -> None:
    """A file in the merged layout: `rows` random unit vectors, hex ids, example.com urls, no failures."""
    import h5py

    vectors = np.random.default_rng(0).standard_normal((rows, dimension), dtype=np.float32)
    ids = np.array([f"{row:016x}" for row in range(rows)], dtype=object)
    with h5py.File(path, "w") as file:
        file["embeddings"] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        file.create_dataset("image_ids", data=ids, dtype=h5py.string_dtype())
        file.create_dataset("urls", data="https://example.com/" + ids + ".jpg", dtype=h5py.string_dtype())
        file["rows"] = np.arange(rows)
        failed = file.create_group("failed")
        for name in ("image_ids", "urls", "reasons"):
            failed.create_dataset(name, shape=(0,), dtype=h5py.string_dtype())
        failed["rows"] = np.zeros(0, np.int64)


def images_per_second(encode: Any, pixels: np.ndarray, batch_size: int) -> float:
    """Images per second of encode(batch) over `pixels`, `batch_size` at a time, after a warm-up batch."""
    encode(pixels[:batch_size])
    began = time.perf_counter()
    for low in range(0, len(pixels), batch_size):
        encode(pixels[low : low + batch_size])
    return len(pixels) / (time.perf_counter() - began)


def model_path(model: str) -> str:
    """MODEL as lib takes it, with 'random' and 'random-small' meaning the random models above."""
    names = {"random": "random-vit-b-32", "random-small": "random-small"}
    return str(random_clip(names[model])) if model in names else model


def s3_admin(endpoint: str) -> Any:
    """A boto3 client of the loopback S3 at `endpoint` that may do anything (moto takes any key)."""
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )


def loopback_s3(bucket: str, objects: dict[str, bytes]) -> tuple[Any, str]:
    """A moto S3 server on loopback with a public-read `bucket` holding `objects`: (server, endpoint)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    admin = s3_admin(endpoint)
    admin.create_bucket(Bucket=bucket)
    public_read = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/*",
            }
        ],
    }
    admin.put_bucket_policy(Bucket=bucket, Policy=json.dumps(public_read))
    for key, data in objects.items():
        admin.put_object(Bucket=bucket, Key=key, Body=data)
    return server, endpoint
