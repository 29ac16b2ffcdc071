"""The benchmark scripts' building blocks, on the tiny model, so the scripts keep working."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import lib
import numpy as np
from PIL import Image
from precision import precision_agreement
from process_stats import peak_rss_mb
from workload import synthetic_jpeg


def test_synthetic_photos_are_open_images_sized_jpegs():
    image = Image.open(io.BytesIO(synthetic_jpeg(seed=3)))
    assert image.format == "JPEG" and image.size == (1024, 768) and image.mode == "RGB"
    assert synthetic_jpeg(seed=3) == synthetic_jpeg(seed=3) != synthetic_jpeg(seed=4)
    assert np.asarray(image).std() > 10, "not a flat image"


def test_precision_agreement_reports_cosines_with_fp32(tiny_checkpoint):
    report = precision_agreement(str(tiny_checkpoint), "cpu", 6, ["bf16"], batch_size=4)
    assert report["images"] == 6 and report["device"] == "cpu"
    bf16 = report["precisions"]["bf16"]
    assert 0.99 < bf16["min_cosine"] <= bf16["mean_cosine"] <= 1.0


def test_the_naive_loop_and_the_pipeline_embed_the_same_photos(tiny_checkpoint, tiny_encoder, tmp_path):
    from conftest import embed_params
    from naive_loop import naive_embed
    from throughput import end_to_end

    paths = []
    for index in range(5):
        paths.append(tmp_path / f"{index}.jpg")
        paths[-1].write_bytes(synthetic_jpeg(seed=index, width=96, height=64))
    naive = naive_embed(paths, str(tiny_checkpoint))
    assert naive.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(naive, axis=1), 1, atol=1e-5)
    assert end_to_end([str(path) for path in paths], tiny_encoder, embed_params()) > 0
    assert peak_rss_mb() > 50


def test_fast_preprocessing_agreement_reports_cosines_and_speeds(tiny_checkpoint):
    from fast_preprocess import fast_agreement

    report = fast_agreement(str(tiny_checkpoint), "cpu", 6, batch_size=4)
    assert report["images"] == 6 and 0.9 < report["min_cosine"] <= report["mean_cosine"] <= 1.0
    assert report["fast_img_s_per_core"] > 0 and report["exact_img_s_per_core"] > 0


def test_the_allocator_benchmark_runs_each_setting_in_a_fresh_process_of_its_own(tiny_checkpoint):
    from allocator import SETTINGS, in_a_process

    runs = {setting: in_a_process(setting, str(tiny_checkpoint), 4, 2) for setting in SETTINGS}
    assert len({run["process"] for run in runs.values()} | {os.getpid()}) == 3
    assert not runs["glibc_defaults"]["freed_memory_kept"], "import lib leaves glibc's allocator alone"
    assert runs["keep_freed_memory"]["freed_memory_kept"]
    assert all(run["img_s"] > 0 and run["page_faults_per_batch"] >= 0 for run in runs.values())


def test_the_openai_checkpoint_benchmark_reports_load_times_and_agrees_with_clip_load(openai_checkpoints):
    from openai_checkpoint import openai_agreement

    report = openai_agreement(openai_checkpoints["TorchScript archive"], 3, ["a dog", "a cat"])
    assert report["images"] == 3 and report["texts"] == 2
    assert report["image_max_abs_difference"] < 1e-5 and report["text_max_abs_difference"] < 1e-5
    assert report["first_load_seconds"] > 0 and report["later_load_seconds"] > 0


def test_the_gpu_check_runs_end_to_end_and_writes_its_report(tiny_checkpoint, tmp_path):
    """On the CPU here: the same script and report, without GPU figures."""
    report_file = tmp_path / "gpu_check.json"
    options = ["--device", "cpu", "--images", "12", "--agreement", "12", "--model", str(tiny_checkpoint)]
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        [str(script), str(report_file), *options], check=True, capture_output=True, env=env, cwd=tmp_path
    )
    report = json.loads(report_file.read_text())
    assert report["pytest_gpu"]["status"] == 0 and "skipped" in report["pytest_gpu"]["summary"]
    for mode in ("exact", "fast"):
        assert report[mode]["img_s"] > 0 and report[mode]["gpu_busy_mean_percent"] is None
    assert report["fast_vs_exact"]["photos"] == 12 and 0.99 < report["fast_vs_exact"]["min_cosine"] <= 1


def test_the_app_latency_benchmark_times_each_way_of_holding_the_vectors(merged):
    from app_latency import HELD, held_index, query_figures

    queries = np.stack([merged.vector(position) for position in range(3)])
    for held in HELD:
        index = held_index(merged, held)
        figures = query_figures(index, queries)
        assert index.held == held and figures["mode"] == ("ivf" if held == "file" else "exact")
        for part in ("search", "shown"):
            assert 0 < figures[part]["p50_ms"] <= figures[part]["p95_ms"]


def test_the_storage_dtype_benchmark_compares_float16_with_float32_top_10(
    tiny_checkpoint, monkeypatch, tmp_path
):
    import storage_dtype
    import workload

    monkeypatch.setattr(workload, "CACHE", tmp_path)
    monkeypatch.setattr(storage_dtype, "photo_folder", lambda count: workload.photo_folder(count, 64, 48))
    report = storage_dtype.photo_figures(24, str(tiny_checkpoint))
    assert report["images"] == report["queries"] == 24
    assert (
        0.9 <= report["top10_overlap"] <= 1 and 0 <= report["same_top10_in_order"] <= report["top10_overlap"]
    )
    assert 0 < report["max_score_difference"] < 2e-3
    assert report["float16_file_bytes"] < report["float32_file_bytes"]
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    same = storage_dtype.search_arrays(vectors, vectors[:20])
    assert storage_dtype.agreement(same, same) == {
        "queries": 20,
        "top10_overlap": 1.0,
        "same_top10_in_order": 1.0,
        "same_top1": 1.0,
        "max_score_difference": 0.0,
    }


def test_the_shards_benchmark_indexes_shards_and_reads_their_members(workspace):
    from shards import fetch_rate, index_figures, shard_files

    files, photos = shard_files(2, 5)
    for name, data in {**files, **photos}.items():
        (workspace.root / name).parent.mkdir(parents=True, exist_ok=True)
        (workspace.root / name).write_bytes(data)
    figures, table = index_figures(str(workspace.root / "shards" / "{00000..00001}.tar"), None)
    assert figures["samples"] == len(table) == 10 and figures["first_s"] > 0
    assert table["caption"].str.startswith("a photo ").all() and table["txt"][0] == "photo 0"
    fetcher = lib.Fetcher()
    assert [fetcher.fetch(location) for location in table["location"]] == [
        photos[name] for name in sorted(photos)
    ]
    assert fetch_rate(fetcher, table["location"].tolist()) > 0
