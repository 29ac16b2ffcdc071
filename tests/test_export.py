"""04's exports: .npy and Parquet beside the file, optionally through PCA, in file order."""

import h5py
import lib
import numpy as np
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
