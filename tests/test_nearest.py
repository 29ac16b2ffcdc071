"""04's search: exact top-k streamed in blocks, the approximate index, query models and vectors."""

import json
import shutil

import h5py
import lib
import numpy as np
import pytest
import torch
from conftest import FAKE_COMMIT, retrained, run_embed, save_table, search_values


def unit_vectors(count: int, dimension: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dimension), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def embeddings_file(path, vectors: np.ndarray) -> lib.nearest.EmbeddingsFile:
    """A file in the merged layout holding `vectors`, with ids 'v<i>'."""
    count = len(vectors)
    with h5py.File(path, "w") as file:
        file["embeddings"] = vectors
        file.create_dataset("image_ids", data=[f"v{i}" for i in range(count)], dtype=h5py.string_dtype())
        file.create_dataset(
            "urls", data=[f"/images/v{i}.jpg" for i in range(count)], dtype=h5py.string_dtype()
        )
        file["rows"] = np.arange(count, dtype=np.int64)
        file.attrs["chunks"] = "[]"
    return lib.open_embeddings(lib.workspace.Collection(path.parent), path)


def test_an_image_used_as_its_own_query_ranks_first_with_score_1(merged, tiny_encoder, image_folder):
    fetcher = lib.Fetcher()
    for position in range(merged.count):
        image_id = merged.records(np.array([position]))["image_id"][0]
        vector = lib.image_query_vector(merged, image_id, tiny_encoder, fetcher)
        top = lib.result_table(merged, lib.search(merged, vector, 5))
        assert top["image_id"][0] == image_id and top["score"][0] == pytest.approx(1, abs=1e-6)
    path = sorted(image_folder.glob("*.jpg"))[3]  # a path, not an id: embedded as 02 embeds it
    top = lib.result_table(
        merged, lib.search(merged, lib.image_query_vector(merged, str(path), tiny_encoder, fetcher), 3)
    )
    assert top["image_id"][0] == path.name and top["score"][0] == pytest.approx(1, abs=1e-5)
    assert list(top["rank"]) == [1, 2, 3] and top["score"].is_monotonic_decreasing


def test_text_queries_run_through_the_models_tokenizer(merged, tiny_encoder):
    queries = ["a dog", "red car at night"]
    vectors = tiny_encoder.encode_text(queries)
    tokens = tiny_encoder.tokenizer(queries, padding=True, return_tensors="pt")
    with torch.no_grad():
        direct = tiny_encoder.model.get_text_features(**tokens).pooler_output
    np.testing.assert_allclose(vectors, torch.nn.functional.normalize(direct, dim=-1).numpy(), atol=1e-6)
    result = lib.search(merged, vectors, 4)
    with h5py.File(merged.path) as file:
        expected = np.argsort(-(vectors @ file["embeddings"][:].T), axis=1)[:, :4]
    np.testing.assert_array_equal(result.positions, expected)


def test_block_streamed_and_in_memory_exact_search_give_identical_results(tmp_path, configure):
    vectors = unit_vectors(20_000, 32, seed=1)
    configure(search_block_bytes=4 * 32 * 1_500)  # 14 blocks, the last one short
    embeddings = embeddings_file(tmp_path / "e.h5", vectors)
    queries = unit_vectors(25, 32, seed=2)
    streamed = lib.search(embeddings, queries, 10)
    in_memory = lib.nearest.exact_search(
        lib.nearest.array_blocks(vectors, embeddings.block_rows), queries, 10
    )
    np.testing.assert_array_equal(streamed.positions, in_memory.positions)
    np.testing.assert_array_equal(streamed.scores, in_memory.scores)
    everything = queries @ vectors.T  # one product: the same top 10, scores to float32 rounding
    np.testing.assert_array_equal(streamed.positions, np.argsort(-everything, axis=1)[:, :10])
    np.testing.assert_allclose(streamed.scores, np.sort(everything, axis=1)[:, ::-1][:, :10], atol=1e-6)


def test_blocks_that_a_caller_keeps_stay_as_they_were_read(tmp_path, configure):
    vectors = unit_vectors(1_000, 8, seed=8)
    configure(search_block_bytes=4 * 8 * 300)  # blocks of 300, 300, 300, 100 rows
    kept = list(embeddings_file(tmp_path / "kept.h5", vectors).blocks())
    assert [start for start, _ in kept] == [0, 300, 600, 900]
    np.testing.assert_array_equal(np.concatenate([block for _, block in kept]), vectors)


def test_ties_at_the_cut_go_to_the_earlier_rows(tmp_path, configure):
    """Twelve equal vectors, ten places: the first ten rows that hold it, in every block layout."""
    vectors = unit_vectors(1_000, 8, seed=7)
    equal = [3, 100, 200, 300, 400, 500, 600, 700, 800, 900, 950, 999]
    vectors[equal] = vectors[500]
    embeddings = embeddings_file(tmp_path / "ties.h5", vectors)
    for rows_per_block in (1_000, 64, 7):
        configure(search_block_bytes=4 * 8 * rows_per_block)
        found = lib.search(embeddings, vectors[500], 10)
        assert found.positions[0].tolist() == equal[:10], rows_per_block


def test_the_approximate_index_agrees_with_exact_search_at_recall_10(tmp_path):
    vectors = unit_vectors(100_000, 16, seed=3)  # the tiny model's embedding size
    embeddings = embeddings_file(tmp_path / "random.h5", vectors)
    queries = unit_vectors(200, vectors.shape[1], seed=4)
    exact = lib.search(embeddings, queries, 10)
    approximate = lib.search(embeddings, queries, 10, index="ivf")
    recall = np.mean(
        [len(set(a) & set(e)) / 10 for a, e in zip(approximate.positions, exact.positions, strict=True)]
    )
    assert recall >= 0.95
    saved = tmp_path / "random.ivf.faiss"
    built = saved.stat().st_mtime_ns
    again = lib.search(embeddings, queries, 10, index="ivf")
    assert saved.stat().st_mtime_ns == built, "the saved index is reused"
    np.testing.assert_array_equal(again.positions, approximate.positions)


def test_a_damaged_index_record_means_building_the_index_again(tmp_path):
    embeddings = embeddings_file(tmp_path / "small.h5", unit_vectors(2_000, 16, seed=5))
    queries = unit_vectors(5, 16, seed=6)
    first = lib.search(embeddings, queries, 5, index="ivf")
    record = tmp_path / "small.ivf.faiss.json"
    record.write_text(record.read_text()[:7])  # cut short by a kill, as a non-atomic write could be
    again = lib.search(embeddings, queries, 5, index="ivf")
    np.testing.assert_array_equal(again.positions, first.positions)
    assert json.loads(record.read_text())["nlist"] == lib.nearest.ivf_lists(2_000)


def test_a_model_of_another_embedding_size_is_an_error(merged, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    other = tmp_path / "other"
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1}
    CLIPModel(
        CLIPConfig(
            text_config=layers, vision_config={**layers, "image_size": 32, "patch_size": 8}, projection_dim=8
        )
    ).save_pretrained(other)
    with pytest.raises(lib.PipelineError, match=r"makes 8-d embeddings, and .* holds 16-d ones"):
        lib.query_encoder(merged, str(other), "cpu")


def test_queries_from_a_model_of_another_revision_are_refused_unless_allowed(
    merged, tiny_checkpoint, tmp_path
):
    other = retrained(tiny_checkpoint, tmp_path / "other", seed=1)
    with pytest.raises(lib.PipelineError) as error:
        lib.query_encoder(merged, str(other), "cpu")
    message = str(error.value)
    assert f"is {other} at revision {lib.model._weights_digest(other)}" in message
    assert (
        f"but the file was made by {tiny_checkpoint} at revision {merged.attrs['model_revision']}" in message
    )
    assert "ALLOW_OTHER_MODEL=True" in message
    encoder = lib.query_encoder(merged, str(other), "cpu", allow_other_model=True)
    assert "NOT the model that made the file" in lib.describe_query_model(merged, encoder)
    assert "embedded by another model" in lib.query_label(merged, encoder, "a dog")
    stored = merged.records(np.array([0]))["image_id"][0]
    assert lib.query_label(merged, encoder, stored, image=True) == repr(stored), (
        "a stored vector is the file's"
    )


def test_the_files_hub_model_named_as_a_parameter_set_names_it_keeps_the_files_commit(
    collection, table, hub_cache, tiny_checkpoint, tmp_path, monkeypatch
):
    """One params/*.yaml gives 04 MODEL: ViT-B/32 too; the hub's main has moved on since 02."""
    import huggingface_hub

    cache = shutil.copytree(hub_cache, tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run_embed(table, lib.load_encoder("ViT-B/32", "cpu"), model="ViT-B/32")
    embeddings = lib.open_embeddings(collection, lib.merge_chunks(collection).path)
    repo = cache / "models--openai--clip-vit-base-patch32"
    retrained(tiny_checkpoint, repo / "snapshots" / ("f" * 40), seed=4)
    (repo / "refs" / "main").write_text("f" * 40)
    encoder = lib.query_encoder(embeddings, "ViT-B/32", "cpu")
    assert encoder.checkpoint.revision == FAKE_COMMIT and lib.nearest.same_model(embeddings, encoder)


def test_the_files_own_model_whose_weights_changed_since_is_refused(
    collection, image_folder, tiny_checkpoint, tmp_path
):
    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    table = save_table(lib.MetadataParams("folder", "validation", str(image_folder), "s3"), collection)
    run_embed(table, lib.load_encoder(str(model), "cpu"), model=str(model))
    embeddings = lib.open_embeddings(collection, lib.merge_chunks(collection).path)
    assert "the model that made the file" in lib.describe_query_model(
        embeddings, lib.query_encoder(embeddings, None, "cpu")
    )
    shutil.rmtree(model)
    retrained(tiny_checkpoint, model, seed=2)  # the same folder, now with other weights
    with pytest.raises(
        lib.PipelineError, match=r"the model that made .* is now .* sha256:.*, but the file was made"
    ):
        lib.query_encoder(embeddings, None, "cpu")


def test_a_missing_file_and_bad_parameters_are_named(collection):
    with pytest.raises(lib.PipelineError, match="EMBEDDINGS file .*missing.h5 does not exist: run 03_merge"):
        lib.open_embeddings(collection, "OUTPUT/missing.h5")
    values = search_values(embeddings="x.h5", device="auto")
    for name, value, allowed in [
        ("queries", "a dog", "a list of non-empty texts"),
        ("top_k", 0, "integer >= 1"),
        ("index", "hnsw", "'exact', 'ivf'"),
        ("export", "csv", "'npy', 'parquet', 'clip-retrieval'"),
        ("pca_dim", 0, "integer >= 1"),
        ("pca_dim", 64, "EXPORT=None exports none: set EXPORT='npy', 'parquet' or 'clip-retrieval' as well"),
        ("export_dtype", "int8", "'float32', 'float16'"),
        ("export_shard_rows", 0, "integer >= 1"),
        ("app", 1, "True or False"),
        ("host", "", "HOST"),
        ("port", 70000, "a TCP port from 1 to 65535"),
        ("port", 7860.0, "a TCP port from 1 to 65535"),
        ("share", "no", "True or False"),
        ("max_pixels", 0, "integer >= 1"),
        ("max_upload_mb", True, "integer >= 1"),
        ("allow_other_model", "yes", "True or False"),
        ("s3_endpoint_url", "localhost:9000", r"use an http\(s\) URL"),
    ]:
        with pytest.raises(lib.ParameterError, match=allowed):
            lib.SearchParams(**{**values, name: value})


def test_a_file_of_another_collection_keeps_its_index_and_exports_in_its_own(
    collection, image_folder, tiny_encoder, workspace
):
    """EMBEDDINGS given outright, OUTPUT_DIR left at OUTPUT: nothing of it lands in OUTPUT/."""
    other = lib.collection("OUTPUT/other")
    save_table(lib.MetadataParams("folder", "validation", str(image_folder), "s3", "OUTPUT/other"), other)
    run_embed(lib.load_image_table(other), tiny_encoder, output_dir="OUTPUT/other")
    lib.merge_chunks(other)
    embeddings = lib.open_embeddings(collection, "OUTPUT/other/Images_Embedded.h5")
    lib.search(embeddings, embeddings.vector(0), 3, index="ivf")
    written = lib.export_embeddings(embeddings, "npy")
    assert (other.folder / "Images_Embedded.ivf.faiss").is_file()
    assert {path.parent for path in written} == {other.folder}
    assert sorted(path.name for path in collection.folder.iterdir()) == ["other"]
    results = lib.result_table(embeddings, lib.search(embeddings, embeddings.vector(0), 3))
    assert embeddings.locations(results["row"], results["url"])[0] == str(
        image_folder / results["image_id"][0]
    )


def test_a_file_in_which_every_image_failed_says_so_instead_of_crashing(collection, tmp_path, tiny_encoder):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes(b"<html></html>")
    run_embed(
        save_table(lib.MetadataParams("folder", "validation", str(folder), "s3"), collection), tiny_encoder
    )
    lib.merge_chunks(collection)
    with pytest.raises(
        lib.PipelineError, match=r"holds no embeddings: all 2 of its images failed \(not an image: 2\)"
    ):
        lib.open_embeddings(collection)


def test_an_image_query_that_is_neither_an_id_nor_an_image_is_named(merged, tiny_encoder, workspace):
    with pytest.raises(
        lib.PipelineError, match=r"IMAGE_QUERY='nowhere.jpg' is neither .* \(file not found\)"
    ):
        lib.image_query_vector(merged, "nowhere.jpg", tiny_encoder, lib.Fetcher())
