"""The notebook tier: the stage notebooks run headless with papermill and under nbval.

Every run happens in a copy of the repository, so OUTPUT/ and .cache/ are the copy's own; the
model is the tiny checkpoint, found as "ViT-B/32" in an offline Hugging Face cache.
"""

import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lib
import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, TINY_IMAGE_SIZE, read_output
from PIL import Image
from reference import openai_image_embeddings, openai_text_embeddings, reference_embeddings

pytestmark = pytest.mark.notebooks
STAGES = ["00_setup", "01_metadata", "02_embed", "03_merge", "04_search"]
EMBED = {"CHUNK": 16, "GPU_BATCH_SIZE": 8, "NUM_WORKERS": 4, "MODEL": "ViT-B/32", "DEVICE": "cpu"}


def run_papermill(notebook: str, arguments: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """papermill's command line, as a user types it."""
    command = [sys.executable, "-m", "papermill", notebook, *arguments]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def papermill(repo: Path, stage: str, parameters: dict, env: dict, cwd: Path | None = None) -> str:
    """Run one stage notebook headless; return its printed output, or fail with papermill's."""
    params_file = repo.parent / f"{stage}.yaml"
    params_file.write_text(yaml.safe_dump(parameters))
    cwd = cwd or repo
    notebook = os.path.relpath(repo / "notebooks" / f"{stage}.ipynb", cwd)
    executed = repo.parent / "runs" / f"{stage}-{time.monotonic_ns()}.ipynb"
    executed.parent.mkdir(exist_ok=True)
    result = run_papermill(notebook, [str(executed), "-f", str(params_file)], cwd, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return printed_output(executed)


def printed_output(path: Path) -> str:
    notebook = nbformat.read(path, as_version=4)
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
    )


def last_outputs(repo: Path) -> list[dict]:
    """Every output of the notebook that `papermill` executed last."""
    executed = max((repo.parent / "runs").glob("*.ipynb"), key=lambda path: path.stat().st_mtime_ns)
    return [
        output for cell in nbformat.read(executed, as_version=4).cells for output in cell.get("outputs", [])
    ]


def failing_papermill(repo: Path, stage: str, arguments: list[str], env: dict) -> str:
    """Run a stage that must fail; return what papermill printed."""
    notebook = str(repo / "notebooks" / f"{stage}.ipynb")
    result = run_papermill(notebook, [str(repo.parent / "failed.ipynb"), *arguments], repo, env)
    assert result.returncode != 0
    return result.stderr


def chunk_files(repo: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (repo / "OUTPUT" / "chunks").glob("*")}


def reference_for(images: dict[str, bytes], ids: list[str], checkpoint: Path) -> np.ndarray:
    """The same model's output on OpenAI-style preprocessed pixels, computed without lib."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(checkpoint).eval()
    decoded = [Image.open(io.BytesIO(images[i])) for i in ids]
    return reference_embeddings(
        model, decoded, TINY_IMAGE_SIZE, lib.preprocess.OPENAI_MEAN, lib.preprocess.OPENAI_STD
    )


# ---------------------------------------------------------------------------------------------
# The committed notebooks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_committed_notebooks_are_clean(stage):
    notebook = nbformat.read(REPO / "notebooks" / f"{stage}.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "strip the outputs"
    assert not {"widgets", "papermill"} & set(notebook.metadata), "strip widget and papermill metadata"
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "one cell tagged 'parameters'"
    for line in tagged[0].source.splitlines():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]* = .+  # .+", line), f"give each parameter a comment: {line}"


@pytest.mark.parametrize(
    ("stage", "params_class"), list(zip(STAGES, lib.params.STAGE_PARAMETERS, strict=True))
)
def test_help_notebook_describes_every_parameter(stage, params_class):
    command = [
        sys.executable,
        "-m",
        "papermill",
        "--help-notebook",
        str(REPO / "notebooks" / f"{stage}.ipynb"),
    ]
    help_text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    for name in lib.params._parameter_names(params_class):
        assert re.search(rf"^  {name}: .*\n +\S", help_text, re.MULTILINE), f"{name} is not described"


def notebook_defaults(stage: str) -> dict:
    """The values of a committed notebook's parameters cell."""
    notebook = nbformat.read(REPO / "notebooks" / f"{stage}.ipynb", as_version=4)
    (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    values: dict = {}
    exec(cell.source, {}, values)
    return values


@pytest.mark.parametrize(
    "name", ["demo", "validation", "train_s3", "folder_example", "table_example", "webdataset_example"]
)
def test_named_parameter_sets_are_valid_for_every_stage(name):
    values = yaml.safe_load((REPO / "params" / f"{name}.yaml").read_text())
    for stage, params_class in zip(STAGES, lib.params.STAGE_PARAMETERS, strict=True):
        lib.read_parameters(params_class, {**notebook_defaults(stage), **values})


# ---------------------------------------------------------------------------------------------
# Chains 01 -> 02 -> 03
# ---------------------------------------------------------------------------------------------


def test_openimages_chain_over_s3(repo, kernel_env, http_server, s3_endpoint, images, tiny_checkpoint):
    """40 images on loopback S3, CHUNK=16: one row per image, exact embeddings, resumable."""
    source = http_server.url("/metadata/validation-images-with-rotation.csv")
    metadata = {"DATASET": "openimages-v7", "SPLIT": "validation", "SOURCE": source, "FETCH": "s3"}
    printed = papermill(repo, "01_metadata", metadata, kernel_env)
    assert "40 images from" in printed
    embed = {**EMBED, "S3_ENDPOINT_URL": s3_endpoint}
    printed = papermill(repo, "02_embed", embed, kernel_env)
    assert "chunks written: 3, already done: 0" in printed and "embedded: 40, failed: 0" in printed
    printed = papermill(
        repo, "03_merge", {"OUTPUT_FILE": "OUTPUT/Images_Embedded.h5", "CLEANUP": False}, kernel_env
    )
    assert "40 embeddings, 0 failed images, from 3 chunk file(s)" in printed

    merged = read_output(repo / "OUTPUT" / "Images_Embedded.h5")
    official = pd.read_csv(io.BytesIO(http_server.files["/metadata/validation-images-with-rotation.csv"][0]))
    assert merged["rows"] == list(range(40))
    assert merged["image_ids"] == official["ImageID"].tolist()
    assert [url.decode() for url in merged["urls"]] == official["OriginalURL"].tolist()
    assert merged["attrs"]["model_id"] == "openai/clip-vit-base-patch32"
    expected = reference_for(images, merged["image_ids"], tiny_checkpoint)
    np.testing.assert_allclose(merged["embeddings"], expected, atol=1e-5)

    search = {"QUERIES": ["a dog"], "TOP_K": 5, "S3_ENDPOINT_URL": s3_endpoint, "EXPORT": "npy"}
    image_hits = sum(hits for path, hits in http_server.hits.items() if path.startswith("/images/"))
    printed = papermill(repo, "04_search", search, kernel_env)
    first = merged["image_ids"][0]
    assert "40 embeddings of 16 dimensions from openai/clip-vit-base-patch32" in printed
    assert re.search(rf"'{first}'\n +rank +score +image_id .*\n +1 +1\.0+ +{first} ", printed)
    assert printed.count("\n    5 ") == 2, "five results for the text query and for the image query"
    assert np.load(repo / "OUTPUT" / "Images_Embedded_embeddings.npy").shape == (40, 16)
    assert len(list((repo / ".cache" / "thumbnails").glob("*.jpg"))) >= 5, "thumbnails over S3"
    assert image_hits == sum(
        hits for path, hits in http_server.hits.items() if path.startswith("/images/")
    ), "no thumbnail came from OriginalURL: each came from where 02 fetched its image"

    before = chunk_files(repo)
    printed = papermill(repo, "02_embed", embed, kernel_env, cwd=repo / "notebooks")
    assert "3 chunk(s) already done, 0 to embed" in printed
    assert chunk_files(repo) == before, "a second run rewrites no finished chunk"


def test_webdataset_chain_over_http_stores_float16(repo, kernel_env, http_server, images, tiny_checkpoint):
    """3 shards with img2dataset's listings on loopback HTTP, read by range requests, stored as float16."""
    from test_shards import dataset_files

    for name, data in dataset_files(images).items():
        http_server.files[f"/notebook-shards/{name}"] = (data, "application/x-tar")
    metadata = {"DATASET": "webdataset", "SOURCE": http_server.url("/notebook-shards/{00000..00002}.tar")}
    printed = papermill(repo, "01_metadata", metadata, kernel_env)
    assert "3 of 3 shard(s) of" in printed and "18 images from" in printed
    printed = papermill(repo, "02_embed", {**EMBED, "STORAGE_DTYPE": "float16"}, kernel_env)
    assert "embedded: 18, failed: 0" in printed
    printed = papermill(repo, "03_merge", {"CLEANUP": False, "STORAGE_DTYPE": "float16"}, kernel_env)
    assert "Embedding dtype: float16" in printed
    merged = read_output(repo / "OUTPUT" / "Images_Embedded.h5")
    assert merged["attrs"]["storage_dtype"] == "float16"
    assert [key.split("/")[1] for key in merged["image_ids"]] == list(images)[:18]
    expected = reference_for(images, [key.split("/")[1] for key in merged["image_ids"]], tiny_checkpoint)
    np.testing.assert_allclose(merged["embeddings"], expected, atol=1e-3)
    printed = papermill(repo, "04_search", {"QUERIES": ["a dog"], "TOP_K": 3}, kernel_env)
    best = re.search(rf"rank +score +image_id .*\n +1 +([\d.]+) +{merged['image_ids'][0]} ", printed)
    assert abs(float(best[1]) - 1) < 2e-3, "the first image first, scored in float32 from float16"


def test_table_chain_over_http_records_every_failure(repo, kernel_env, http_server, images):
    ids = sorted(images)[:6]
    rows = [(i, http_server.url(f"/images/{i}.jpg")) for i in ids[:3]] + [
        ("missing", http_server.url("/status/404/missing.jpg")),
        ("server-error", http_server.url("/status/500/error.jpg")),
        ("recovers", http_server.url(f"/flaky/images/{ids[3]}.jpg")),
        ("truncated", http_server.url(f"/truncated/images/{ids[4]}.jpg")),
        ("html", http_server.url(f"/html/images/{ids[5]}.jpg")),
        ("relative", f"../images/{ids[5]}.jpg"),
    ]
    csv = "image_id,url\n" + "".join(f"{i},{u}\n" for i, u in rows)
    http_server.files["/lists/catalogue.csv"] = (csv.encode(), "text/csv")
    metadata = {"DATASET": "table", "SOURCE": http_server.url("/lists/catalogue.csv")}
    papermill(repo, "01_metadata", metadata, kernel_env)
    printed = papermill(repo, "02_embed", {**EMBED, "CHUNK": 4}, kernel_env)
    assert "embedded: 5, failed: 4" in printed
    papermill(repo, "03_merge", {"OUTPUT_FILE": "OUTPUT/catalogue.h5", "CLEANUP": True}, kernel_env)
    merged = read_output(repo / "OUTPUT" / "catalogue.h5")
    assert merged["image_ids"] == [*ids[:3], "recovers", "relative"]
    assert dict(zip(merged["failed_ids"], merged["reasons"], strict=True)) == {
        "missing": "http 404",
        "server-error": "http 500",
        "truncated": "truncated body",
        "html": "not an image",
    }
    assert chunk_files(repo) == {}, "CLEANUP removed the chunk files"


def test_folder_chain_from_the_notebooks_folder(repo, kernel_env, images, tmp_path):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for n, (key, data) in enumerate(list(images.items())[:10]):
        (folder / ("nested" if n % 2 else "") / f"{key}.jpg").write_bytes(data)
    notebooks = repo / "notebooks"
    papermill(repo, "01_metadata", {"DATASET": "folder", "SOURCE": str(folder)}, kernel_env, cwd=notebooks)
    papermill(repo, "02_embed", {**EMBED, "CHUNK": 3}, kernel_env, cwd=notebooks)
    papermill(
        repo, "03_merge", {"OUTPUT_FILE": "OUTPUT/photos.h5", "CLEANUP": False}, kernel_env, cwd=notebooks
    )
    merged = read_output(repo / "OUTPUT" / "photos.h5")
    assert len(merged["image_ids"]) == 10 and merged["image_ids"][0] == f"{sorted(images)[0]}.jpg"
    assert merged["image_ids"][-1].startswith("nested/")


@pytest.mark.parametrize("form", ["state dict", "TorchScript archive"])
def test_an_openai_checkpoint_runs_the_chain_with_openai_clips_vectors(
    form, repo, kernel_env, images, openai_checkpoints, tmp_path
):
    folder = tmp_path / "photos"
    folder.mkdir()
    files = {f"{key}.jpg": folder / f"{key}.jpg" for key in list(images)[:12]}
    for name, path in files.items():
        path.write_bytes(images[name.removesuffix(".jpg")])
    (repo / "models").mkdir()
    shutil.copy(openai_checkpoints[form], repo / "models" / "ViT-B-32.pt")
    papermill(repo, "01_metadata", {"DATASET": "folder", "SOURCE": str(folder)}, kernel_env)
    printed = papermill(repo, "02_embed", {**EMBED, "MODEL": "models/ViT-B-32.pt", "CHUNK": 5}, kernel_env)
    assert f"Converting {repo / 'models' / 'ViT-B-32.pt'} ({form})" in printed
    assert "embedded: 12, failed: 0" in printed
    papermill(repo, "03_merge", {"OUTPUT_FILE": None, "CLEANUP": False}, kernel_env)
    merged = read_output(repo / "OUTPUT" / "Images_Embedded.h5")
    expected = openai_image_embeddings(openai_checkpoints[form], files)
    np.testing.assert_allclose(merged["embeddings"], [expected[i] for i in merged["image_ids"]], atol=1e-5)

    search = {"QUERIES": ["a red square"], "TOP_K": 3, "APP": True, "PORT": None}
    export = {"EXPORT": "clip-retrieval", "EXPORT_DTYPE": "float16", "EXPORT_SHARD_ROWS": 5}
    printed = papermill(repo, "04_search", {**search, **export}, kernel_env)
    assert f"12 embeddings of 32 dimensions from {repo / 'models' / 'ViT-B-32.pt'}" in printed
    query = openai_text_embeddings(openai_checkpoints[form], ["a red square"])[0]
    best = merged["image_ids"][int(np.argmax(merged["embeddings"] @ query))]
    assert re.search(rf"'a red square'\n +rank +score +image_id .*\n +1 +\S+ +{re.escape(best)} ", printed)
    shards = repo / "OUTPUT" / "Images_Embedded_float16_export" / "img_emb"
    assert [np.load(shards / f"img_emb_{k}.npy").shape for k in range(3)] == [(5, 32), (5, 32), (2, 32)]
    assert "12 x 32 vectors held in memory (float32)" in printed
    url = re.search(r"search app at (http://127\.0\.0\.1:\d+/)", printed).group(1)
    shown = [output for output in last_outputs(repo) if "text/html" in output.get("data", {})]
    assert any(url.rstrip("/") in output["data"]["text/html"] for output in shown), "the app, inline"


# ---------------------------------------------------------------------------------------------
# make run, and what a headless run shows while it works
# ---------------------------------------------------------------------------------------------


def make_run(repo: Path, params: str, env: dict, log: Path) -> None:
    """`make run PARAMS=... > log 2>&1` in `repo`, with this Python and its installed requirements."""
    command = ["make", "run", f"PARAMS={params}", f"PYTHON={sys.executable}", "-o", ".venv/.installed-run"]
    with open(log, "w") as output:
        result = subprocess.run(
            command, cwd=repo, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=600
        )
    assert result.returncode == 0, log.read_text()[-3000:]


def test_make_run_keeps_collections_side_by_side_and_every_stage_in_its_log(repo, kernel_env, images):
    """The folder and the table example, one after the other in one checkout, each searching its own file."""
    for name in ("Makefile", "requirements.txt", "params"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, repo / name)
    photos = repo / "data" / "images"
    photos.mkdir(parents=True)
    for key, data in list(images.items())[:12]:
        (photos / f"{key}.jpg").write_bytes(data)
    listing = "image_id,url\n" + "".join(
        f"item-{n},images/{key}.jpg\n" for n, key in enumerate(sorted(images)[:6])
    )
    (repo / "data" / "catalogue.csv").write_text(listing)
    logs = {}
    for name, folder, count in (("folder_example", "folder", 12), ("table_example", "catalogue", 6)):
        logs[name] = repo.parent / f"{name}.log"
        make_run(repo, f"params/{name}.yaml", kernel_env, logs[name])
        printed = logs[name].read_text()
        for stage in STAGES:
            executed = repo / "OUTPUT" / folder / "runs" / name / f"{stage}.ipynb"
            assert f"== {stage} with params/{name}.yaml; executed notebook: {executed}" in printed
            assert executed.is_file()
        assert (
            f"Wrote the image table: {count} rows to {repo / 'OUTPUT' / folder / 'image_table.parquet'}"
            in printed
        )
        assert f"images attempted: {count}, embedded: {count}, failed: 0" in printed
        assert (
            f"{repo / 'OUTPUT' / folder / 'Images_Embedded.h5'}: {count} embeddings, 0 failed images"
            in printed
        )
        assert f"{count} embeddings of 16 dimensions from openai/clip-vit-base-patch32" in printed
        assert "device: cpu" in printed and "rank    score" in printed
        assert "[IPKernelApp] WARNING" not in printed, "kernels start encrypted and are shut down in turn"
    assert read_output(repo / "OUTPUT" / "catalogue" / "Images_Embedded.h5")["image_ids"] == [
        f"item-{n}" for n in range(6)
    ]
    assert not (repo / "OUTPUT" / "chunks").exists() and not (repo / "OUTPUT" / "Images_Embedded.h5").exists()


@pytest.mark.parametrize(("declared", "encrypted"), [(["curve"], True), ("curve", True), (None, False)])
def test_make_runs_kernels_are_encrypted_where_their_kernelspec_allows_and_local_elsewhere(
    monkeypatch, declared, encrypted
):
    """A kernel on unencrypted TCP warns at every start; one on IPC sockets does not."""
    import jupyter_client
    import run_stages

    spec = jupyter_client.kernelspec.get_kernel_spec("python3")
    spec.metadata = {} if declared is None else {"supported_encryption": declared}
    monkeypatch.setattr(jupyter_client.kernelspec, "get_kernel_spec", lambda name: spec)
    manager = run_stages.QuietKernelManager(kernel_name="python3")
    if encrypted:
        assert manager.transport_encryption == "auto"
    else:
        assert (manager.transport, manager.transport_encryption) == ("ipc", "disabled")


def test_a_headless_02_prints_progress_lines_before_its_summary(repo, kernel_env, images, tmp_path):
    keys = sorted(images)
    folder = tmp_path / "photos"
    folder.mkdir()
    for key in keys:
        (folder / f"{key}.jpg").write_bytes(images[key])
    rows = "".join(f"row-{row},{folder / keys[row % len(keys)]}.jpg\n" for row in range(500))
    (tmp_path / "listing.csv").write_text("image_id,url\n" + rows)
    papermill(repo, "01_metadata", {"DATASET": "table", "SOURCE": str(tmp_path / "listing.csv")}, kernel_env)
    params_file = tmp_path / "02.yaml"
    params_file.write_text(yaml.safe_dump({**EMBED, "CHUNK": 250}))
    result = run_papermill(
        "notebooks/02_embed.ipynb",
        [str(tmp_path / "02.ipynb"), "-f", str(params_file), "--log-output"],
        repo,
        kernel_env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = result.stderr.splitlines()
    summary = next(n for n, line in enumerate(logged) if line.startswith("chunks written: 2"))
    progress = [line for line in logged[:summary] if line.startswith("[02] ")]
    assert len(progress) >= 2 and "500 of 500 rows (100.0%)" in progress[-1], logged[:summary]


# ---------------------------------------------------------------------------------------------
# nbval, and what a user sees when something is wrong
# ---------------------------------------------------------------------------------------------


def test_every_notebook_runs_under_nbval(repo, kernel_env, images, tmp_path):
    """nbval --nbval-lax on copies prepared with test parameters: every cell runs, asserts hold."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for key, data in list(images.items())[:5]:
        (folder / f"{key}.jpg").write_bytes(data)
    values = {"DEVICE": "cpu", "DATASET": "folder", "SOURCE": str(folder), **EMBED, "CHUNK": 2, "TOP_K": 3}
    values["EMBEDDINGS"] = "OUTPUT/nbval.h5"
    params_file = tmp_path / "test.yaml"
    params_file.write_text(yaml.safe_dump({**values, "OUTPUT_FILE": "OUTPUT/nbval.h5", "CLEANUP": False}))
    for stage in STAGES:
        notebook = repo / "notebooks" / f"{stage}.ipynb"
        prepare = [sys.executable, "-m", "papermill", "--prepare-only", "-f", str(params_file)]
        subprocess.run(
            [*prepare, str(notebook), str(notebook)], env=kernel_env, check=True, capture_output=True
        )
    notebooks = [str(repo / "notebooks" / f"{stage}.ipynb") for stage in STAGES]
    command = [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q", *notebooks]
    result = subprocess.run(command, cwd=repo, env=kernel_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert (repo / "OUTPUT" / "nbval.h5").is_file()


def test_an_unknown_parameter_stops_the_stage_with_its_name(repo, kernel_env):
    stderr = failing_papermill(repo, "02_embed", ["-p", "CHUNKS", "500"], kernel_env)
    assert "ParameterError: Unknown parameter CHUNKS=500: did you mean CHUNK?" in stderr


def test_a_variable_of_the_notebooks_own_does_not_stop_a_stage(repo, kernel_env):
    """A researcher adds MY_NOTE after the parameters cell; papermill injecting that name is still a typo."""
    path = repo / "notebooks" / "00_setup.ipynb"
    notebook = nbformat.read(path, as_version=4)
    at = next(n for n, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(at + 1, nbformat.v4.new_code_cell('MY_NOTE = "my own"'))
    nbformat.write(notebook, path)
    executed = repo.parent / "own.ipynb"
    result = run_papermill(str(path), [str(executed), "-p", "DEVICE", "cpu"], repo, kernel_env)
    assert result.returncode == 0, result.stderr[-3000:]
    warned = [
        output.text
        for cell in nbformat.read(executed, as_version=4).cells
        for output in cell.get("outputs", [])
        if output.get("name") == "stderr"
    ]
    assert any("MY_NOTE is not a parameter of any stage" in text for text in warned)
    stderr = failing_papermill(repo, "00_setup", ["-p", "MY_NOTE", "injected"], kernel_env)
    assert "ParameterError: Unknown parameter MY_NOTE=" in stderr


def test_offline_the_stages_say_what_they_could_not_reach(repo, kernel_env, images, tmp_path):
    """Without a network, 01 names the metadata URL and 02 the model, each with what to do instead."""
    began = time.monotonic()
    url = "http://127.0.0.1:9/validation-images-with-rotation.csv"
    stderr = failing_papermill(repo, "01_metadata", ["-p", "SOURCE", url], kernel_env)
    assert f"PipelineError: Could not download {url}" in stderr and "set SOURCE to its path" in stderr
    assert "Traceback" not in stderr.split("PapermillExecutionError")[-1], "the cell shows no traceback"

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(next(iter(images.values())))
    papermill(repo, "01_metadata", {"DATASET": "folder", "SOURCE": str(folder)}, kernel_env)
    stderr = failing_papermill(repo, "02_embed", ["-p", "MODEL", "ViT-L/14"], kernel_env)
    assert "PipelineError: Could not get the model 'openai/clip-vit-large-patch14'" in stderr
    assert "set MODEL to a local directory" in stderr
    assert time.monotonic() - began < 60
