"""The per-chunk pipeline: every row embedded or failed with its reason, exactly as the model gives."""

import contextlib
import io
import shutil
import threading
import time

import lib
import numpy as np
from conftest import (
    TINY_IMAGE_SIZE,
    jpeg_bytes,
    read_output,
    run_embed,
)
from PIL import Image
from reference import reference_embeddings


def test_every_row_is_embedded_or_failed_with_its_reason(table, tiny_encoder, collection):
    summary = run_embed(table, tiny_encoder)
    assert summary.chunks_written == 3 and summary.attempted == len(table) == 20
    assert summary.embedded == 18
    assert dict(summary.failed_by_reason) == {"decode: truncated file": 1, "not an image": 1}
    chunks = lib.find_chunks(collection.chunks)
    assert [(c.start, c.end) for c in chunks] == [(0, 8), (8, 16), (16, 20)]
    assert sum(c.embedded + c.failed for c in chunks) == 20
    assert not list(collection.chunks.glob("*.tmp")), "no temporary file is left behind"
    last = read_output(chunks[-1].path)  # broken.jpg and page.png sort after the hex ids
    assert last["rows"] == [16, 17]
    assert last["failed_rows"] == [18, 19]
    assert last["reasons"] == ["decode: truncated file", "not an image"]


def test_embeddings_equal_the_model_on_openai_preprocessed_pixels(
    collection, table, tiny_encoder, image_folder
):
    run_embed(table, tiny_encoder)
    for info in lib.find_chunks(collection.chunks):
        chunk = read_output(info.path)
        images = [Image.open(io.BytesIO((image_folder / i).read_bytes())) for i in chunk["image_ids"]]
        expected = reference_embeddings(
            tiny_encoder.model, images, TINY_IMAGE_SIZE, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD
        )
        np.testing.assert_allclose(chunk["embeddings"], expected, atol=1e-6)


def test_apply_rotation_turns_each_row_by_the_tables_rotation(
    collection, image_folder, tiny_encoder, tmp_path
):
    names = sorted(path.name for path in image_folder.glob("*.jpg"))[:5]
    listing = tmp_path / "rotated.csv"
    rows = [f"{name},{image_folder / name},{90 * turns}" for turns, name in enumerate(names[:4])]
    rows.append(f"{names[4]},{image_folder / names[4]},")  # no rotation known: as is
    listing.write_text("image_id,url,rotation\n" + "\n".join(rows) + "\n")
    params = lib.MetadataParams("table", "validation", str(listing), "s3")
    lib.save_image_table(lib.build_image_table(params), params, collection)
    run_embed(lib.load_image_table(collection), tiny_encoder, apply_rotation=True)
    (chunk,) = [read_output(info.path) for info in lib.find_chunks(collection.chunks)]
    images = [Image.open(image_folder / name) for name in names]
    turned = [Image.fromarray(np.rot90(np.asarray(image), turns % 4)) for turns, image in enumerate(images)]
    expected = reference_embeddings(
        tiny_encoder.model, turned, TINY_IMAGE_SIZE, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD
    )
    np.testing.assert_allclose(chunk["embeddings"], expected, atol=1e-6)
    assert chunk["attrs"]["apply_rotation"] and not chunk["attrs"]["exif_transpose"]


def test_the_same_image_gives_the_same_vector_in_any_chunk(collection, table, tiny_encoder, workspace):
    run_embed(table, tiny_encoder, chunk=7, gpu_batch_size=2)
    by_row = {}
    for info in lib.find_chunks(collection.chunks):
        chunk = read_output(info.path)
        by_row.update(zip(chunk["rows"], chunk["embeddings"], strict=True))
    other = lib.workspace.Collection(workspace.root.parent / "other")  # a collection of the same table
    other.folder.mkdir()
    shutil.copy(collection.table, other.table)
    run_embed(
        lib.load_image_table(other), tiny_encoder, chunk=20, gpu_batch_size=5, output_dir=str(other.folder)
    )
    (whole,) = lib.find_chunks(other.chunks)
    chunk = read_output(whole.path)
    for row, vector in zip(chunk["rows"], chunk["embeddings"], strict=True):
        np.testing.assert_allclose(vector, by_row[row], atol=1e-6)


class Gauge:
    """How many threads are inside a block at once, and the most there ever were."""

    def __init__(self):
        self.now = self.peak = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def inside(self):
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            yield
        finally:
            with self._lock:
                self.now -= 1


def test_fetches_outnumber_decoding_threads_and_images_come_in_order():
    photos = {f"photo-{index}": jpeg_bytes(40, 30, seed=index) for index in range(24)}
    fetching, decoding = Gauge(), Gauge()
    exact = lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(TINY_IMAGE_SIZE))

    class SlowNetwork:
        def fetch(self, location):
            with fetching.inside():
                time.sleep(0.05)
                return photos[location]

    def recipe(data, rotation):
        with decoding.inside():
            return exact(data, rotation)

    with lib.embed.ImageLoader(SlowNetwork(), recipe, workers=2, lookahead=40) as loader:
        loaded = list(loader.load(photos, [None] * len(photos)))
    assert decoding.peak <= 2 < fetching.peak <= lib.embed.FETCH_THREADS_PER_WORKER * 2
    for item, data in zip(loaded, photos.values(), strict=True):
        np.testing.assert_array_equal(item.pixels, exact(data))
