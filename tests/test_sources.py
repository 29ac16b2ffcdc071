"""Sources: Open Images metadata, user tables and folders -> the normalised image table."""

import hashlib
import json

import lib
import numpy as np
import pandas as pd
import pytest
from conftest import ROWS, md5_base64, metadata, official_metadata_csv
from PIL import Image


def test_openimages_s3_locations_follow_the_bucket_layout(workspace, http_server, images):
    source = http_server.url("/metadata/validation-images-with-rotation.csv")
    table = lib.build_image_table(metadata("openimages-v7", source))
    ids = sorted(images)
    assert list(table.columns) == list(lib.sources.TABLE_COLUMNS)
    assert table["image_id"].tolist() == ids
    assert table["location"][0] == f"s3://open-images-dataset/validation/{ids[0]}.jpg"
    assert table["url"][0] == http_server.url(f"/images/{ids[0]}.jpg")
    assert table["rotation"][:4].tolist()[:2] == [0.0, 90.0]
    assert np.isnan(table["rotation"][2]) and table["rotation"][3] == 180.0


def test_openimages_url_fetch_uses_original_url(workspace, http_server):
    source = http_server.url("/metadata/validation-images-with-rotation.csv")
    table = lib.build_image_table(metadata("openimages-v7", source, fetch="url"))
    assert (table["location"] == table["url"]).all()


def test_openimages_url_fetch_checks_the_original_md5(workspace, http_server, images):
    """OriginalMD5 is the Flickr original's digest: it checks OriginalURL's bytes, not the S3 copies'."""
    source = http_server.url("/metadata/validation-images-with-rotation.csv")
    by_url = lib.build_image_table(metadata("openimages-v7", source, fetch="url"))
    assert by_url["md5"].tolist() == [hashlib.md5(images[key]).hexdigest() for key in by_url["image_id"]]
    assert (lib.build_image_table(metadata("openimages-v7", source))["md5"] == "").all()


def test_a_listing_may_give_md5s_in_hex_or_base64(workspace, tmp_path, images):
    keys = sorted(images)[:3]
    digests = [hashlib.md5(images[keys[0]]).hexdigest().upper(), md5_base64(images[keys[1]]), ""]
    rows = "".join(f"{key},/x/{key}.jpg,{digest}\n" for key, digest in zip(keys, digests, strict=True))
    listing = tmp_path / "list.csv"
    listing.write_text("image_id,url,md5\n" + rows)
    table = lib.build_image_table(metadata("table", str(listing)))
    assert table["md5"].tolist() == [hashlib.md5(images[key]).hexdigest() for key in keys[:2]] + [""]
    listing.write_text("image_id,url,md5\na,/x/a.jpg,not-a-digest\n")
    with pytest.raises(
        lib.PipelineError, match=r"1 md5 value\(s\) that are neither 32 hex digits .*'not-a-digest'"
    ):
        lib.build_image_table(metadata("table", str(listing)))


def test_openimages_test_split_keys(workspace, http_server, images):
    csv = official_metadata_csv(images, lambda i: http_server.url(f"/images/{i}.jpg"), subset="test")
    http_server.files["/metadata/test-images-with-rotation.csv"] = (csv, "text/csv")
    source = http_server.url("/metadata/test-images-with-rotation.csv")
    table = lib.build_image_table(metadata("openimages-v7", source, split="test"))
    assert table["location"][0].startswith("s3://open-images-dataset/test/")


def test_a_split_that_is_not_the_csvs_is_named(workspace, http_server):
    """Every S3 key would be missing: SPLIT names the bucket's folder, the CSV its images."""
    source = http_server.url("/metadata/validation-images-with-rotation.csv")
    with pytest.raises(
        lib.PipelineError, match=r"another split than SPLIT='test' in its Subset column \(validation: 40 row"
    ):
        lib.build_image_table(metadata("openimages-v7", source, split="test"))


def test_a_csv_in_another_format_is_refused(workspace, tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("image_id,url\na,http://x/a.jpg\n")
    with pytest.raises(lib.PipelineError, match=r"not in the official Open Images format.*DATASET='table'"):
        lib.build_image_table(metadata("openimages-v7", str(listing)))


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("list.csv", lambda path: pd.DataFrame(ROWS).to_csv(path, index=False)),
        ("list.tsv", lambda path: pd.DataFrame(ROWS).to_csv(path, index=False, sep="\t")),
        ("list.json", lambda path: path.write_text(json.dumps(ROWS))),
        ("columns.json", lambda path: path.write_text(json.dumps(pd.DataFrame(ROWS).to_dict("list")))),
        ("list.jsonl", lambda path: pd.DataFrame(ROWS).to_json(path, orient="records", lines=True)),
        ("list.parquet", lambda path: pd.DataFrame(ROWS).to_parquet(path)),
    ],
)
def test_table_formats(workspace, tmp_path, name, write):
    path = tmp_path / name
    write(path)
    table = lib.build_image_table(metadata("table", str(path)))
    assert table["image_id"].tolist() == ["007", "8"], "ids stay strings, leading zeros kept"
    assert table["location"].tolist() == ["http://example.com/a.jpg", str(tmp_path / "img/b.png")]
    assert table["url"].tolist() == ["http://example.com/a.jpg", "img/b.png"]


def test_a_listings_rotation_column_is_kept(workspace, tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("image_id,url,rotation\na,a.jpg,90\nb,b.jpg,\nc,c.jpg,270.0\n")
    rotation = lib.build_image_table(metadata("table", str(path)))["rotation"]
    assert rotation.tolist()[::2] == [90.0, 270.0] and np.isnan(rotation[1])


def test_table_over_http_resolves_relative_urls_against_the_table(workspace, http_server):
    http_server.files["/lists/catalogue.csv"] = (b"image_id,url,title\np1,../images/x.jpg,Shoe\n", "text/csv")
    table = lib.build_image_table(metadata("table", http_server.url("/lists/catalogue.csv")))
    assert table["location"].tolist() == [http_server.url("/images/x.jpg")]


def test_the_original_notebooks_pair_of_json_lists(workspace, http_server, images):
    source = {
        "image_id": http_server.url("/metadata/image_ids.json"),
        "url": http_server.url("/metadata/image_urls.json"),
    }
    table = lib.build_image_table(metadata("table", source))
    assert table["image_id"].tolist() == sorted(images)
    assert table["location"][0] == http_server.url(f"/images/{sorted(images)[0]}.jpg")


def test_json_lists_of_different_lengths(workspace, tmp_path):
    (tmp_path / "ids.json").write_text('["a", "b"]')
    (tmp_path / "urls.json").write_text('["u"]')
    source = {"image_id": str(tmp_path / "ids.json"), "url": str(tmp_path / "urls.json")}
    with pytest.raises(lib.PipelineError, match="differ in length"):
        lib.build_image_table(metadata("table", source))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("id,link\na,b\n", r"lacks the column\(s\) \['image_id', 'url'\]; its columns are \['id', 'link'\]"),
        ("image_id,url\n", "holds no images"),
        ("image_id,url\na,http://x/1\nb,http://x/2\na,http://x/3\n", r"1 duplicate image_id.*'a': 2"),
        ("image_id,url\na,http://x/1\nb,\n", r"1 row\(s\) with an empty url, e.g. row\(s\) \[1\]"),
        (
            "image_id,url,rotation\na,http://x/1,45\nb,http://x/2,up\n",
            r"2 row\(s\) whose rotation is not 0, 90",
        ),
    ],
)
def test_bad_tables_are_clear_errors(workspace, tmp_path, content, message):
    path = tmp_path / "list.csv"
    path.write_text(content)
    with pytest.raises(lib.PipelineError, match=message):
        lib.build_image_table(metadata("table", str(path)))


def test_unknown_table_extension(workspace, tmp_path):
    path = tmp_path / "list.xlsx"
    path.write_bytes(b"")
    with pytest.raises(lib.PipelineError, match=r"use a file ending in .csv, .tsv, .json, .jsonl, .parquet"):
        lib.build_image_table(metadata("table", str(path)))


def test_missing_table_file(workspace):
    with pytest.raises(lib.PipelineError, match="SOURCE file .*nowhere.csv does not exist"):
        lib.build_image_table(metadata("table", "nowhere.csv"))


def test_folder_lists_image_files_recursively_and_sorted(workspace, tmp_path):
    folder = tmp_path / "photos"
    for name in [
        "b.jpg",
        "a.PNG",
        "sub/c.webp",
        "sub/deeper/d.tif",
        "notes.txt",
        ".hidden.jpg",
        ".thumbs/e.jpg",
    ]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    table = lib.build_image_table(metadata("folder", str(folder)))
    assert table["image_id"].tolist() == ["a.PNG", "b.jpg", "sub/c.webp", "sub/deeper/d.tif"]
    assert table["location"][2] == str(folder / "sub/c.webp") == table["url"][2]


def test_folder_lists_multi_picture_jpegs_which_pillow_opens_through_its_jpeg_plugin(workspace, tmp_path):
    (tmp_path / "stereo").mkdir()
    left, right = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), "white")
    left.save(tmp_path / "stereo" / "left-right.mpo", "MPO", save_all=True, append_images=[right])
    assert Image.open(tmp_path / "stereo" / "left-right.mpo").format == "MPO"
    table = lib.build_image_table(metadata("folder", str(tmp_path / "stereo")))
    assert table["image_id"].tolist() == ["left-right.mpo"]


def test_folder_paths_are_relative_to_the_repository_root(workspace):
    (workspace.root / "data" / "images").mkdir(parents=True)
    (workspace.root / "data" / "images" / "x.jpg").write_bytes(b"x")
    table = lib.build_image_table(metadata("folder", "data/images"))
    assert table["location"].tolist() == [str(workspace.root / "data" / "images" / "x.jpg")]


def test_missing_and_empty_folders(workspace, tmp_path):
    with pytest.raises(lib.PipelineError, match="does not exist or is not a folder"):
        lib.build_image_table(metadata("folder", str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(lib.PipelineError, match="holds no images"):
        lib.build_image_table(metadata("folder", str(tmp_path / "empty")))
