"""Downloads: metadata fetched once into .cache/downloads/, verified, unreachable sources named."""

import lib
import pandas as pd
import pytest
from conftest import ROWS, closed_port_url, metadata


def test_downloads_are_cached_and_checked(workspace, http_server):
    path = "/metadata/validation-images-with-rotation.csv"
    before = http_server.hits.get(path, 0)
    first = lib.downloads.cached_download(http_server.url(path), hint="")
    second = lib.downloads.cached_download(http_server.url(path), hint="")
    assert first == second and http_server.hits[path] == before + 1
    first.write_bytes(first.read_bytes()[:-10])  # a damaged copy is fetched again
    third = lib.downloads.cached_download(http_server.url(path), hint="")
    assert http_server.hits[path] == before + 2
    assert third.read_bytes() == http_server.files[path][0]


def test_a_gzip_encoded_download_is_checked_by_the_bytes_that_came(workspace, http_server):
    """Content-Length counts the encoded body; the file holds it decoded."""
    path = "/metadata/validation-images-with-rotation.csv"
    downloaded = lib.downloads.cached_download(http_server.url("/gzip" + path), hint="")
    assert downloaded.read_bytes() == http_server.files[path][0]


def test_unreachable_metadata_names_the_url_and_how_to_point_elsewhere(workspace, fast_retries):
    url = closed_port_url("/validation-images-with-rotation.csv")
    with pytest.raises(lib.PipelineError) as error:
        lib.build_image_table(metadata("openimages-v7", url))
    message = str(error.value)
    assert f"Could not download {url}: cannot connect to 127.0.0.1:" in message
    assert "set SOURCE to its path" in message
    assert not list(workspace.downloads.glob("*/*")), "no partial download is left behind"


def test_an_http_error_on_metadata_is_reported(workspace, http_server):
    with pytest.raises(lib.PipelineError, match="answered HTTP 404"):
        lib.build_image_table(metadata("openimages-v7", http_server.url("/metadata/missing.csv")))


def test_google_drive_links_go_through_gdown(workspace, tmp_path, monkeypatch):
    import gdown

    calls = []

    def fake_download(url, output, quiet, fuzzy):
        calls.append((url, fuzzy))
        saved = f"{output}catalogue.csv"
        pd.DataFrame(ROWS).to_csv(saved, index=False)
        return saved

    monkeypatch.setattr(gdown, "download", fake_download)
    link = "https://drive.google.com/file/d/1AbC/view?usp=sharing"
    table = lib.build_image_table(metadata("table", link))
    assert calls == [(link, True)] and len(table) == 2
    lib.build_image_table(metadata("table", link))
    assert len(calls) == 1, "the second run uses the verified cached copy"


def test_a_damaged_download_record_means_downloading_again(workspace, http_server):
    path = "/metadata/validation-images-with-rotation.csv"
    first = lib.downloads.cached_download(http_server.url(path), hint="")
    before = http_server.hits[path]
    record = first.with_name(first.name + ".download.json")
    record.write_text(record.read_text()[:10])  # cut short by a kill, as a non-atomic write could be
    again = lib.downloads.cached_download(http_server.url(path), hint="")
    assert again.read_bytes() == http_server.files[path][0] and http_server.hits[path] == before + 1
