"""04's search app: how it holds the vectors, what each query shows, its limits, its ZIP, its server."""

import html
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import lib
import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from conftest import REPO, embed_params, embed_rows, folder_of_images, jpeg_bytes, save_table, search_values
from PIL import Image

HOSTILE_ID = "<img src=x onerror=alert(1)>.jpg"  # a folder's image_id is its file name


def search_params(**overrides) -> lib.SearchParams:
    return lib.SearchParams(**search_values(top_k=5, port=None, **overrides))


@pytest.fixture
def app_folder(tmp_path, images):
    """12 images, a byte-for-byte copy of the first (a near-duplicate), and one with a hostile image_id."""
    folder = folder_of_images(tmp_path / "app-images", images, 12)
    first = next(iter(images))
    (folder / f"{first}~copy.jpg").write_bytes(images[first])  # sorts after the first, so ranks below it
    (folder / HOSTILE_ID).write_bytes(jpeg_bytes(64, 48, seed=99))
    return folder


@pytest.fixture
def app_file(app_folder, collection, tiny_encoder) -> lib.nearest.EmbeddingsFile:
    table = save_table(lib.MetadataParams("folder", "validation", str(app_folder), "s3"), collection)
    embed_rows(table, tiny_encoder, embed_params())
    return lib.open_embeddings(collection, lib.merge_chunks(collection).path)


@pytest.fixture
def search_app(app_file, tiny_encoder, tmp_path) -> lib.app.SearchApp:
    index = lib.vector_index.hold_vectors(app_file)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    return lib.app.SearchApp(app_file, tiny_encoder, lib.Fetcher(), index, search_params(), downloads)


def image_ids(shown: lib.app.Shown) -> list[str]:
    return shown.results["image_id"].tolist()


def test_vectors_are_held_as_float32_or_float16_as_memory_allows_else_left_in_the_file(app_file):
    float32_bytes = 4 * app_file.count * app_file.dimension
    queries = np.stack([app_file.vector(2), app_file.vector(5)])
    exact = lib.search(app_file, queries, 4)
    for available, held in [(10 * float32_bytes, "float32"), (float32_bytes, "float16"), (100, "file")]:
        index = lib.vector_index.hold_vectors(app_file, available=available)
        assert index.held == held
        result = index.search(queries, 4)
        np.testing.assert_array_equal(result.positions[:, 0], [2, 5])
        np.testing.assert_allclose(result.scores, exact.scores, atol=1e-3)
        np.testing.assert_allclose(index.vectors_at(np.array([5])), app_file.vector(5)[None], atol=1e-3)
        assert index.default_mode == ("ivf" if held == "file" else "exact")
    assert lib.vector_index.hold_vectors(app_file).held == "float32"
    np.testing.assert_array_equal(
        lib.vector_index.hold_vectors(app_file).search(queries, 4).positions, exact.positions
    )


def test_a_near_duplicate_of_a_higher_result_is_hidden_unless_the_toggle_is_off(search_app, app_file, images):
    first = f"{next(iter(images))}.jpg"
    query = search_app.reference_query(first)
    hidden = search_app.show(query, 5, "exact", True)
    every = search_app.show(query, 14, "exact", False)
    assert image_ids(every)[:2] == [first, f"{next(iter(images))}~copy.jpg"]
    assert image_ids(hidden)[0] == first and len(hidden.results) == 5
    vectors = {
        image_id: app_file.vector(position) for position, image_id in every.results["image_id"].items()
    }
    shown = image_ids(hidden)
    rank = {image_id: n for n, image_id in enumerate(image_ids(every))}
    passed_over = [image_id for image_id in image_ids(every)[: rank[shown[-1]]] if image_id not in shown]
    threshold = lib.subset.NEAR_DUPLICATE_SCORE
    for later, image_id in enumerate(shown):
        assert all(vectors[image_id] @ vectors[higher] < threshold for higher in shown[:later])
    for image_id in passed_over:
        higher = [kept for kept in shown if rank[kept] < rank[image_id]]
        assert max(vectors[image_id] @ vectors[kept] for kept in higher) >= threshold
    assert f"{next(iter(images))}~copy.jpg" in passed_over
    plural = "s" if len(passed_over) > 1 else ""
    assert f"{len(passed_over)} near-duplicate{plural} of a higher result hidden" in hidden.status
    assert image_ids(search_app.show(query, 5, "exact", False)) == image_ids(every)[:5]
    assert "near-duplicate" not in every.status


def test_each_kind_of_query_finds_the_image_it_is_made_from(search_app, app_folder, images, http_server):
    key = f"{list(images)[3]}.jpg"
    for query in (
        search_app.reference_query(key),
        search_app.upload_query(str(app_folder / key)),
        search_app.reference_query(http_server.url(f"/images/{key}")),
    ):
        shown = search_app.show(query, 3, "exact", True)
        assert image_ids(shown)[0] == key and shown.results["score"].iloc[0] == pytest.approx(1, abs=1e-5)
    clicked = search_app.result_query(shown.results, 1)
    assert image_ids(search_app.show(clicked, 3, "exact", True))[0] == image_ids(shown)[1]
    text = search_app.text_query("a photo of a dog")
    text_shown = search_app.show(text, 4, "ivf", False)
    assert len(text_shown.gallery) == 4 and "text encoded in" in text_shown.status
    assert all(path.endswith(".jpg") for path, _ in text_shown.gallery)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (lambda app, folder: app.reference_query("/etc/passwd"), "reads no path on its machine"),
        (lambda app, folder: app.reference_query("file:///etc/passwd"), "reads no path on its machine"),
        (lambda app, folder: app.text_query("  "), "Type a text"),
        (lambda app, folder: app.upload_query(None), "Upload an image"),
        (lambda app, folder: app.upload_query(str(folder / "huge.png")), "larger than MAX_UPLOAD_MB=1"),
        (lambda app, folder: app.upload_query(str(folder / "wide.png")), "more than MAX_PIXELS=10,000"),
        (lambda app, folder: app.upload_query(str(folder / "page.png")), "not an image"),
    ],
)
def test_a_query_the_app_refuses_says_why(app_file, tiny_encoder, tmp_path, query, message):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), np.uint8)).save(
        tmp_path / "huge.png"
    )
    Image.new("RGB", (200, 60)).save(tmp_path / "wide.png")
    (tmp_path / "page.png").write_bytes(b"<html>not an image</html>")
    index = lib.vector_index.hold_vectors(app_file)
    app = lib.app.SearchApp(
        app_file,
        tiny_encoder,
        lib.Fetcher(),
        index,
        search_params(max_upload_mb=1, max_pixels=10_000),
        tmp_path,
    )
    with pytest.raises(lib.PipelineError, match=message) as error:
        query(app, tmp_path)
    failed = app.failed(error.value)
    assert failed.gallery == [] and failed.results.empty
    assert html.escape(str(error.value)) in failed.status and 'class="error"' in failed.status


def test_strings_of_the_file_and_of_errors_are_shown_escaped(search_app):
    shown = search_app.show(search_app.reference_query(HOSTILE_ID), 2, "exact", True)
    assert image_ids(shown)[0] == HOSTILE_ID and HOSTILE_ID not in shown.status
    assert "&lt;img src=x onerror=alert(1)&gt;" in shown.status
    assert "<b>" not in search_app.failed(lib.PipelineError("<b>bold</b>")).status


def test_the_zip_holds_the_shown_images_as_fetched_and_a_csv_of_them(search_app, app_folder, images):
    key = list(images)[4]
    shown = search_app.show(search_app.reference_query(f"{key}.jpg"), 4, "exact", True)
    (app_folder / shown.results["image_id"].iloc[2]).unlink()
    earlier = search_app.downloads / "earlier" / "Images_Embedded-results.zip"
    earlier.parent.mkdir()
    earlier.write_bytes(b"an earlier download")
    os.utime(earlier, (time.time() - 3600, time.time() - 3600))
    with zipfile.ZipFile(search_app.download(shown.results)) as archive:
        csv = pd.read_csv(io.BytesIO(archive.read("results.csv")), dtype={"image_id": str, "file": str})
        names = archive.namelist()
        assert archive.read(f"images/001_{key}.jpg.jpg") == images[key]
    assert csv.columns.tolist()[:8] == [
        "rank",
        "score",
        "image_id",
        "url",
        "row",
        "file",
        "missing",
        "location",
    ]
    assert csv["image_id"].tolist() == image_ids(shown)
    assert csv["missing"].fillna("").tolist() == ["", "", "file not found", ""]
    assert sorted(names) == sorted(["results.csv", *csv["file"].dropna()])
    assert search_app.download(lib.app.NO_RESULTS) is None
    assert not earlier.parent.exists(), "a ZIP older than ZIP_KEPT_SECONDS is deleted"


def test_an_image_id_becomes_a_safe_file_name_in_the_zip():
    assert lib.subset._file_stem("../../etc/passwd") == "_.._etc_passwd"
    assert lib.subset._file_stem(HOSTILE_ID) == "_img_src_x_onerror_alert_1__.jpg"


@pytest.fixture
def served(app_file, tiny_encoder, capsys):
    page = lib.app.launch_app(app_file, tiny_encoder, lib.Fetcher(), search_params())
    yield page
    page.close()


def test_the_server_binds_loopback_makes_no_share_link_and_serves_no_path_of_a_request(
    served, app_file, collection
):
    assert served.local_url.startswith("http://127.0.0.1:") and served.share_url is None
    for path in (str(collection.table), str(app_file.path), "/etc/passwd"):
        response = requests.get(f"{served.local_url}gradio_api/file={path}", timeout=10)
        assert response.status_code in (403, 404), path


# ---------------------------------------------------------------------------------------------
# In a real browser: Debian's chromium, driven by Playwright
# ---------------------------------------------------------------------------------------------

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "app"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]


@pytest.fixture
def browser_page():
    """A headless chromium page (Debian's chromium: Playwright's own browser download cannot work here)."""
    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("needs Debian's chromium: apt-get install chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100}, accept_downloads=True)
        yield page
        browser.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def captions(page) -> list[str]:
    return page.locator("#results .caption-label").all_inner_texts()


@pytest.mark.browser
def test_in_a_browser_text_upload_click_and_zip(served, browser_page, app_folder, images):
    page = browser_page
    page.goto(served.local_url)
    page.locator("#text-query textarea").fill("a photo of a dog")
    page.locator("#text-query textarea").press("Enter")
    page.wait_for_function("document.querySelectorAll('#results .caption-label').length == 5")
    assert "text encoded in" in page.locator("#search-status").inner_text()
    screenshot(page, "1-text-query")
    page.locator("#index-mode label", has_text="ivf").click()  # the same query again, on the IVF index
    page.wait_for_function("document.querySelector('#search-status')?.innerText.includes('(ivf, ')")
    assert len(captions(page)) == 5 and "'a photo of a dog'" in page.locator("#search-status").inner_text()

    key = f"{list(images)[3]}.jpg"
    page.locator("#upload-query input[type=file]").set_input_files(str(app_folder / key))
    page.wait_for_function("document.querySelector('#search-status')?.innerText.includes('uploaded')")
    assert captions(page)[0] == f"#1 1.000 {key}"
    screenshot(page, "2-image-upload")

    second = captions(page)[1].split(" ", 2)[2]
    page.locator("#results .thumbnail-item").nth(1).click()
    page.wait_for_function("document.querySelector('#search-status')?.innerText.includes('result #2')")
    assert captions(page)[0] == f"#1 1.000 {second}"
    screenshot(page, "3-click-a-result")

    page.locator("#zip-button").click()
    link = page.locator("#zip-file a")
    link.wait_for()
    with page.expect_download() as download:
        link.click()
    screenshot(page, "4-download-zip")
    with zipfile.ZipFile(download.value.path()) as archive:
        csv = pd.read_csv(io.BytesIO(archive.read("results.csv")), dtype=str)
        assert csv["image_id"].tolist() == [caption.split(" ", 2)[2] for caption in captions(page)]
        assert sorted(archive.namelist()) == sorted(["results.csv", *csv["file"]])
        for name, image_id in zip(csv["file"], csv["image_id"], strict=True):
            assert archive.read(name) == (app_folder / image_id).read_bytes()


@pytest.mark.browser
def test_in_a_browser_a_hostile_image_id_shows_as_text(served, browser_page):
    page = browser_page
    page.goto(served.local_url)
    page.locator("#reference-query textarea").fill(HOSTILE_ID)
    page.locator("#reference-query textarea").press("Enter")
    page.wait_for_function("document.querySelectorAll('#results .caption-label').length == 5")
    assert captions(page)[0] == f"#1 1.000 {HOSTILE_ID}"
    assert HOSTILE_ID in page.locator("#search-status").inner_text()
    assert page.locator('img[src="x"]').count() == 0
    screenshot(page, "5-hostile-image-id")
    page.locator("#reference-query textarea").fill("/etc/passwd")
    page.locator("#reference-query textarea").press("Enter")
    page.wait_for_function(
        "document.querySelector('#search-status.error')?.innerText.includes('reads no path')"
    )
    assert captions(page) == []
    screenshot(page, "6-a-refused-query")


def test_an_image_sent_inline_is_refused_before_gradio_decodes_it(search_app):
    import gradio as gr
    from gradio.data_classes import ImageData

    page = lib.app.build_page(search_app, 5)
    upload = next(
        block for block in page.blocks.values() if getattr(block, "elem_id", None) == "upload-query"
    )
    with pytest.raises(gr.Error, match="file uploads only"):
        upload.preprocess(ImageData(url="data:image/png;base64,iVBORw0KGgo="))
    assert upload.preprocess(None) is None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def repository_in(root: Path) -> Path:
    """`root` made a copy of the repository's notebooks, their lib package and the Makefile."""
    shutil.copytree(REPO / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "Makefile", root)
    return root


def test_make_app_serves_the_file_until_interrupted(app_file, workspace, kernel_env, tiny_checkpoint):
    repo = repository_in(workspace.root)
    port = free_port()
    params = repo / "tiny.yaml"  # the file was embedded by the tiny model, which 'tiny' does not name
    params.write_text(yaml.safe_dump({"MODEL": str(tiny_checkpoint), "DEVICE": "cpu", "TOP_K": 3}))
    command = ["make", "app", f"EMBEDDINGS={app_file.path}", f"PORT={port}", f"PARAMS={params}"]
    command.append(f"PYTHON={sys.executable}")
    app = subprocess.Popen(
        [*command, "-o", ".venv/.installed-run"],
        cwd=repo,
        env=kernel_env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group, as a terminal's, for Ctrl-C
    )
    stuck = threading.Timer(120, os.killpg, (app.pid, signal.SIGKILL))  # a server that never says where it is
    stuck.start()
    try:
        lines = []
        while not any("search app at" in line for line in lines):
            lines.append(app.stdout.readline())
            assert lines[-1] or app.poll() is None, "".join(lines)
        assert f"search app at http://127.0.0.1:{port}/" in lines[-1]
        assert "held in memory (float32)" in "".join(lines)
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
    finally:
        stuck.cancel()
        os.killpg(app.pid, signal.SIGINT)  # Ctrl-C
        assert app.wait(timeout=60) in (0, 2, -signal.SIGINT)


def test_make_app_says_what_is_wrong_with_its_file(workspace, kernel_env, tmp_path):
    repo = repository_in(workspace.root)
    command = ["make", "app", f"EMBEDDINGS={tmp_path / 'none.h5'}", f"PYTHON={sys.executable}"]
    result = subprocess.run(
        [*command, "-o", ".venv/.installed-run"], cwd=repo, env=kernel_env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert f"search app: EMBEDDINGS file {tmp_path / 'none.h5'} does not exist" in result.stderr
