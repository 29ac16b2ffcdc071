"""STORAGE_DTYPE: vectors normalised in float32 and stored as float32 or float16, by 02 and by 03."""

import re

import h5py
import lib
import numpy as np
import pytest
from conftest import read_output, run_embed, search_values
from test_merge import run_original_snippet

OUTPUT_FILE = "OUTPUT/Images_Embedded.h5"


@pytest.fixture
def float32_file(collection, table, tiny_encoder, tmp_path):
    """The float32 merged file of the test table, kept apart from the collection's chunks."""
    run_embed(table, tiny_encoder)
    path = tmp_path / "float32.h5"
    lib.merge_chunks(collection, str(path))
    return read_output(path)


def test_float16_chunks_hold_the_float32_vectors_rounded_once(collection, table, tiny_encoder, float32_file):
    for chunk in collection.chunks.glob("chunk_*.h5"):
        chunk.unlink()
    run_embed(table, tiny_encoder, storage_dtype="float16")
    for info in lib.find_chunks(collection.chunks):
        assert info.attrs["storage_dtype"] == "float16"
    report = lib.merge_chunks(collection, OUTPUT_FILE, storage_dtype="float16")
    merged = read_output(report.path)
    assert merged["embeddings"].dtype == np.float16 and merged["attrs"]["storage_dtype"] == "float16"
    np.testing.assert_array_equal(merged["embeddings"], float32_file["embeddings"].astype(np.float16))
    assert merged["image_ids"] == float32_file["image_ids"] and merged["reasons"] == float32_file["reasons"]


def test_a_run_never_adds_chunks_of_another_storage_type(collection, table, tiny_encoder):
    run_embed(table, tiny_encoder, end=8)
    with pytest.raises(lib.PipelineError, match=r"STORAGE_DTYPE: 'float32' recorded, 'float16' requested"):
        run_embed(table, tiny_encoder, storage_dtype="float16")


def test_chunks_written_before_storage_dtype_existed_are_float32(collection, table, tiny_encoder):
    run_embed(table, tiny_encoder, end=8)
    (chunk,) = collection.chunks.glob("chunk_*.h5")
    with h5py.File(chunk, "a") as file:
        del file.attrs["storage_dtype"]
    assert run_embed(table, tiny_encoder).chunks_written == 2
    assert read_output(lib.merge_chunks(collection).path)["attrs"]["storage_dtype"] == "float32"


def test_merge_refuses_chunks_of_two_storage_types(collection, table, tiny_encoder):
    run_embed(table, tiny_encoder)
    second = lib.find_chunks(collection.chunks)[1]
    rewritten = {**second.attrs, "storage_dtype": "float16"}
    lib.chunkfile.write_chunk(second.path, lib.chunkfile.read_chunk_result(second.path), rewritten)
    with pytest.raises(
        lib.PipelineError,
        match=r"were made differently \(STORAGE_DTYPE: 'float32' chunk_0+_0+8.h5, 'float16'",
    ):
        lib.merge_chunks(collection)


def test_float32_chunks_merge_into_float16_and_back(collection, table, tiny_encoder, float32_file):
    report = lib.merge_chunks(collection, OUTPUT_FILE, storage_dtype="float16")
    half = read_output(report.path)
    np.testing.assert_array_equal(half["embeddings"], float32_file["embeddings"].astype(np.float16))
    assert not lib.merge_chunks(collection, OUTPUT_FILE, storage_dtype="float16").written
    again = lib.merge_chunks(collection, OUTPUT_FILE)
    assert again.written and read_output(again.path)["embeddings"].dtype == np.float32


def test_float16_chunks_are_not_merged_as_float32(collection, table, tiny_encoder):
    run_embed(table, tiny_encoder, storage_dtype="float16")
    with pytest.raises(
        lib.PipelineError, match=r"hold float16 vectors .* set STORAGE_DTYPE='float16' here too"
    ):
        lib.merge_chunks(collection)


def test_a_damaged_float32_chunk_is_caught_when_stored_as_float16(
    collection, table, tiny_encoder, float32_file
):
    chunk = sorted(collection.chunks.glob("chunk_*.h5"))[1]
    with h5py.File(chunk, "a") as file:
        vectors = file["embeddings"][:]
        file["embeddings"][0] = vectors[1]  # unit length still, so only the digest tells
    with pytest.raises(lib.PipelineError, match=rf"{chunk.name} does not reproduce its own digest"):
        lib.merge_chunks(collection, OUTPUT_FILE, storage_dtype="float16")


def test_retrying_failed_rows_keeps_a_float16_chunk_float16(
    collection, table, tiny_encoder, image_folder, images
):
    run_embed(table, tiny_encoder, storage_dtype="float16", chunk=20)
    before = read_output(next(collection.chunks.glob("chunk_*.h5")))
    assert before["failed_ids"] == ["broken.jpg", "page.png"]
    (image_folder / "broken.jpg").write_bytes(list(images.values())[30])  # whole now
    run_embed(table, tiny_encoder, storage_dtype="float16", chunk=20, retry_failed=True)
    after = read_output(next(collection.chunks.glob("chunk_*.h5")))
    assert after["embeddings"].dtype == np.float16 and after["failed_ids"] == ["page.png"]
    kept = [after["image_ids"].index(image_id) for image_id in before["image_ids"]]
    np.testing.assert_array_equal(after["embeddings"][kept], before["embeddings"])
    added = after["embeddings"][after["image_ids"].index("broken.jpg")].astype(np.float32)
    assert abs(np.linalg.norm(added) - 1) < 1e-3


def test_a_cleaned_up_file_is_not_made_again_as_another_type(collection, table, tiny_encoder):
    run_embed(table, tiny_encoder)
    lib.merge_chunks(collection, cleanup=True)
    with pytest.raises(
        lib.PipelineError, match=r"stores its vectors as float32 and holds the rows of chunk files"
    ):
        lib.merge_chunks(collection, storage_dtype="float16")
    assert not lib.merge_chunks(collection).written


def test_the_ivf_index_of_a_float16_file_is_its_own(collection, table, tiny_encoder, float32_file):
    lib.merge_chunks(collection)
    float32_key = lib.nearest._index_key(lib.open_embeddings(collection))
    lib.merge_chunks(collection, storage_dtype="float16")
    assert lib.nearest._index_key(lib.open_embeddings(collection)) != float32_key


def merged_of(rows: int, dimension: int, storage_dtype: str, path) -> int:
    """The size in bytes of a merged file of `rows` random unit vectors, stored as `storage_dtype`."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    result = lib.chunkfile.ChunkResult(0, rows, dimension, vectors=[vectors])
    for row in range(rows):
        result.embedded.append(row, f"{row:016x}", f"s3://open-images-dataset/validation/{row:016x}.jpg")
    collection = lib.collection(f"OUTPUT/{storage_dtype}")
    attrs = {**ATTRS, "storage_dtype": storage_dtype, "embedding_size": dimension}
    lib.chunkfile.write_chunk(lib.chunkfile.chunk_path(collection.chunks, 0, rows), result, attrs)
    report = lib.merge_chunks(collection, str(path), storage_dtype=storage_dtype)
    return report.path.stat().st_size


ATTRS = {
    "format_version": lib.chunkfile.FORMAT_VERSION,
    **dict.fromkeys(lib.chunkfile.SIGNATURE_KEYS, "x"),
    "model": "ViT-B/32",
    "model_id": "openai/clip-vit-base-patch32",
    "device": "cpu",
    "library_versions": "{}",
    "max_pixels": 1,
    "source": '{"rows": 2000}',
}


def test_float16_storage_halves_the_merged_file_of_vit_b_32_vectors(workspace, tmp_path):
    """Acceptance: 512-d vectors with Open Images' ids and S3 urls, float16 beside float32."""
    float32_size = merged_of(2000, 512, "float32", tmp_path / "float32.h5")
    float16_size = merged_of(2000, 512, "float16", tmp_path / "float16.h5")
    assert 0.45 < float16_size / float32_size < 0.56


def test_the_original_readers_snippet_reads_a_float16_file(
    collection, table, tiny_encoder, float32_file, workspace, capsys
):
    lib.merge_chunks(collection, OUTPUT_FILE, storage_dtype="float16")
    run_original_snippet(workspace.root)
    out = capsys.readouterr().out
    assert "Number of images: 18" in out and "Embedding dtype: float16" in out
    best = re.search(r"Similarity: ([\d.]+), URL: (.*)", out)
    assert abs(float(best[1]) - 1) < 2e-3 and best[2] == float32_file["urls"][0].decode()


def test_search_scores_a_float16_file_in_float32(collection, table, tiny_encoder, float32_file):
    lib.merge_chunks(collection, OUTPUT_FILE, storage_dtype="float16")
    params = lib.SearchParams(**search_values())
    embeddings = lib.open_embeddings(collection, params.embeddings)
    queries = float32_file["embeddings"][:4]
    found = lib.search(embeddings, queries, 5)
    stored = float32_file["embeddings"].astype(np.float16).astype(np.float32)
    scores = queries @ stored.T
    assert found.scores.dtype == np.float32
    np.testing.assert_allclose(found.scores, np.sort(scores, axis=1)[:, ::-1][:, :5], rtol=0, atol=1e-6)
    assert embeddings.vectors(np.array([2, 0])).dtype == np.float32
    assert embeddings.vector(3).dtype == np.float32
