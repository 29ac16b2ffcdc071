"""04's exports: .npy and Parquet beside the file, optionally through PCA, in file order."""

import h5py
import lib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest


@pytest.mark.parametrize("pca_dim", [None, 6])
def test_exports_hold_every_embedding_and_id_in_file_order(merged, pca_dim):
    with h5py.File(merged.path) as file:
        vectors, ids = file["embeddings"][:], file["image_ids"].asstr()[:].tolist()
        urls = file["urls"].asstr()[:].tolist()
    npy = lib.export_embeddings(merged, "npy", pca_dim)
    parquet = pq.read_table(lib.export_embeddings(merged, "parquet", pca_dim)[0]).to_pandas()
    exported = np.load(npy[0])
    assert np.load(npy[1]).tolist() == ids == parquet["image_id"].tolist()
    assert np.load(npy[2]).tolist() == urls
    np.testing.assert_array_equal(np.stack(parquet["embedding"]), exported)
    if pca_dim is None:
        np.testing.assert_array_equal(exported, vectors)
        return
    components = np.load(npy[-1])
    centred = vectors.astype(np.float64) - vectors.mean(0)
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(
        np.abs(components["components"] @ directions[:pca_dim].T), np.eye(pca_dim), atol=1e-3
    )
    ratio = singular[:pca_dim] ** 2 / (singular**2).sum()
    np.testing.assert_allclose(components["explained_variance_ratio"], ratio, rtol=1e-3)
    assert exported.shape == (merged.count, pca_dim)
    np.testing.assert_allclose(np.linalg.norm(exported, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize(("dtype", "pca_dim"), [("float32", None), ("float16", 6)])
def test_embedding_reader_reads_the_clip_retrieval_export_back_row_for_row(
    merged, collection, dtype, pca_dim
):
    from embedding_reader import EmbeddingReader

    written = lib.export_embeddings(merged, "clip-retrieval", pca_dim, dtype, shard_rows=5)
    export = written[0]
    assert sorted(path.name for path in (export / "img_emb").iterdir()) == [
        f"img_emb_{k}.npy" for k in range(4)
    ]
    reader = EmbeddingReader(
        str(export / "img_emb"),
        file_format="parquet_npy",
        metadata_folder=str(export / "metadata"),
        meta_columns=["image_id", "url", "row", "location"],
    )
    batches = list(reader(batch_size=4, show_progress=False))
    vectors = np.concatenate([vectors for vectors, _ in batches])
    metadata = pd.concat([meta for _, meta in batches], ignore_index=True)
    with h5py.File(merged.path) as file:
        stored, rows = file["embeddings"][:], file["rows"][:]
        assert metadata["image_id"].tolist() == file["image_ids"].asstr()[:].tolist()
        assert metadata["url"].tolist() == file["urls"].asstr()[:].tolist()
    assert metadata["row"].tolist() == rows.tolist()
    table = pd.read_parquet(collection.table)
    assert metadata["location"].tolist() == table["location"].iloc[rows].tolist()
    assert reader.count == merged.count
    assert {np.load(path).dtype for path in (export / "img_emb").iterdir()} == {np.dtype(dtype)}
    if pca_dim is None:
        np.testing.assert_array_equal(vectors, stored)
    else:
        np.testing.assert_array_equal(
            vectors, np.load(lib.export_embeddings(merged, "npy", pca_dim)[0]).astype(dtype)
        )
        assert written[-1].name == "Images_Embedded_pca6_float16_components.npz"


def test_a_clip_retrieval_export_again_replaces_the_whole_folder(merged):
    export = lib.export_embeddings(merged, "clip-retrieval", shard_rows=2)[0]
    assert len(list((export / "metadata").iterdir())) == 9
    assert lib.export_embeddings(merged, "clip-retrieval", shard_rows=100) == [export]
    assert [path.name for path in (export / "img_emb").iterdir()] == ["img_emb_0.npy"]
    assert sorted(path.name for path in merged.folder.iterdir() if "export" in path.name) == [export.name]


def test_float16_exports_hold_the_float32_vectors_rounded(merged):
    with h5py.File(merged.path) as file:
        stored = file["embeddings"][:]
    npy = lib.export_embeddings(merged, "npy", dtype="float16")
    parquet = pq.read_table(lib.export_embeddings(merged, "parquet", dtype="float16")[0]).to_pandas()
    assert npy[0].name == "Images_Embedded_float16_embeddings.npy"
    np.testing.assert_array_equal(np.load(npy[0]), stored.astype(np.float16))
    np.testing.assert_array_equal(np.stack(parquet["embedding"]), stored.astype(np.float16))
