"""DATASET='webdataset': tar shards on disk, loopback HTTP (Range) and loopback S3, indexed once by 01
and read member by member by 02, with the vectors of the same images embedded from a folder."""

import io
import json
import tarfile
from pathlib import Path

import lib
import numpy as np
import pandas as pd
import pytest
from conftest import closed_port_url, embed_params, merged_output, run_embed, save_table
from workload import embed_rows, loopback_s3, s3_admin, webdataset_tar

SHARD_SIZE = 6  # samples per shard: 18 images in 3 shards
BUCKET = "webdataset-shards"


def sample_members(key: str, image: bytes) -> dict[str, bytes]:
    """A WebDataset sample as img2dataset writes one: the image, its caption and a JSON record."""
    record = {"key": key, "url": f"https://images.example/{key}.jpg", "width": 64}
    return {"jpg": image, "txt": f"caption of {key}".encode(), "json": json.dumps(record).encode()}


def sidecar_bytes(samples: dict[str, dict[str, bytes]], failed: tuple[str, ...] = ()) -> bytes:
    """img2dataset's .parquet beside a shard: a row per key, with url, caption and status."""
    keys = [*samples, *failed]
    listing = pd.DataFrame(
        {
            "key": keys,
            "url": [f"https://images.example/{key.rsplit('/', 1)[-1]}.jpg" for key in keys],
            "caption": [f"a photo {key}" for key in keys],
            "status": ["success"] * len(samples) + ["failed_to_download"] * len(failed),
        }
    )
    buffer = io.BytesIO()
    listing.to_parquet(buffer, index=False)
    return buffer.getvalue()


def dataset_files(images: dict[str, bytes], count: int = 18) -> dict[str, bytes]:
    """Shards 00000.tar.. of SHARD_SIZE samples (keys 'shard/<image id>') and their img2dataset listings."""
    keys = list(images)[:count]
    files = {}
    for number, low in enumerate(range(0, count, SHARD_SIZE)):
        samples = {
            f"{number:05d}/{key}": sample_members(key, images[key]) for key in keys[low : low + SHARD_SIZE]
        }
        files[f"{number:05d}.tar"] = webdataset_tar(samples)
        files[f"{number:05d}.parquet"] = sidecar_bytes(samples, failed=(f"{number:05d}/gone",))
    return files


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def webdataset_params(source: str, endpoint: str | None = None) -> lib.MetadataParams:
    return lib.MetadataParams("webdataset", "validation", source, "s3", s3_endpoint_url=endpoint)


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("shards/{000..003}.tar", ["shards/000.tar", "shards/001.tar", "shards/002.tar", "shards/003.tar"]),
        ("s3://b/{8..11}.tar", ["s3://b/8.tar", "s3://b/9.tar", "s3://b/10.tar", "s3://b/11.tar"]),
        ("{train,val}-{0..1}.tar", ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]),
        ("one.tar", ["one.tar"]),
    ],
)
def test_brace_patterns_expand_as_webdataset_writes_them(pattern, names):
    assert lib.shards.expand_braces(pattern) == names


def test_a_backwards_range_is_an_error():
    with pytest.raises(lib.PipelineError, match=r"the range \{9..3\} runs backwards; write \{3..9\}"):
        lib.shards.expand_braces("s/{9..3}.tar")


def test_local_shards_give_a_row_per_sample_with_its_byte_range_and_text_members(workspace, tmp_path, images):
    folder = write_files(tmp_path / "shards", dataset_files(images))
    table = lib.build_image_table(webdataset_params(str(folder / "{00000..00002}.tar")))
    keys = [f"{low // SHARD_SIZE:05d}/{key}" for low, key in enumerate(list(images)[:18])]
    assert table["image_id"].tolist() == keys
    fetcher = lib.Fetcher()
    assert [fetcher.fetch(location) for location in table["location"]] == list(images.values())[:18]
    first = table.iloc[0]
    key = list(images)[0]
    assert first["location"].startswith(f"{folder}/00000.tar#bytes=")
    assert (first["url"], first["caption"]) == (f"https://images.example/{key}.jpg", f"a photo 00000/{key}")
    assert first["txt"] == f"caption of {key}" and json.loads(first["json"])["key"] == key
    assert "gone" not in " ".join(table["image_id"])  # img2dataset's failed rows have no image


def test_without_a_listing_the_url_is_the_location_and_odd_samples_are_counted(
    workspace, tmp_path, images, capsys
):
    first, second = list(images.values())[:2]
    samples = {
        "a/1": {"txt": b"no image here"},
        "a/2": {"png": second, "jpg": first, "cls": b"7"},
        "a/3": {"jpg": second, "notes.txt": b"x" * (lib.shards.SMALL_MEMBER_BYTES + 1)},
        "a/4": {"jpg": b"", "npy": b"\x93NUMPY\xff\xfe"},
    }
    write_files(tmp_path, {"only.tar": webdataset_tar(samples)})
    table = lib.build_image_table(webdataset_params(str(tmp_path / "only.tar")))
    assert table["image_id"].tolist() == ["a/2", "a/3", "a/4"]
    with pytest.raises(lib.ImageFailure, match="empty body"):
        lib.Fetcher().fetch(table["location"][2])
    assert (table["url"] == table["location"]).all() and table["caption"].eq("").all()
    assert lib.Fetcher().fetch(table["location"][0]) == first  # of jpg and png, jpg
    assert table["cls"].tolist() == ["7", "", ""]
    printed = capsys.readouterr().out
    assert "1 sample(s) without an image member, left out" in printed
    assert "1 sample(s) with several images, of which the row takes the first of ('jpg'" in printed
    assert "2 member(s) neither images nor UTF-8 texts of 1 KiB or less, not columns" in printed
    assert "npy" not in table.columns


def test_a_shard_is_read_once_then_again_only_when_it_changes(workspace, tmp_path, images, monkeypatch):
    folder = write_files(tmp_path / "shards", dataset_files(images))
    params = webdataset_params(str(folder / "{00000..00002}.tar"))
    first = lib.build_image_table(params)
    read = []
    original = lib.shards._index_archive
    monkeypatch.setattr(
        lib.shards, "_index_archive", lambda shard, *rest: read.append(shard) or original(shard, *rest)
    )
    pd.testing.assert_frame_equal(lib.build_image_table(params), first)
    assert read == []
    changed = {f"00001/{key}": sample_members(key, images[key]) for key in list(images)[20:22]}
    (folder / "00001.tar").write_bytes(webdataset_tar(changed))
    (folder / "00001.parquet").unlink()
    again = lib.build_image_table(params)
    assert read == [str(folder / "00001.tar")]
    assert again["image_id"].tolist()[SHARD_SIZE : SHARD_SIZE + 2] == list(changed)


def test_a_missing_shard_is_named_and_left_out(workspace, tmp_path, images, capsys):
    files = dataset_files(images)
    del files["00001.tar"]
    folder = write_files(tmp_path / "shards", files)
    table = lib.build_image_table(webdataset_params(str(folder / "{00000..00002}.tar")))
    assert len(table) == 2 * SHARD_SIZE
    printed = capsys.readouterr().out
    assert (
        f"WARNING: 1 shard(s) do not exist, and their images are not in the table: {folder}/00001.tar"
        in printed
    )
    with pytest.raises(
        lib.PipelineError, match=r"None of the 2 shard\(s\) of SOURCE='.*\{7..8\}.tar' could be"
    ):
        lib.build_image_table(webdataset_params(str(folder / "{7..8}.tar")))


def test_shards_that_are_no_tar_archives_are_named_and_left_out(workspace, tmp_path, images, capsys):
    folder = write_files(tmp_path / "shards", dataset_files(images))
    (folder / "00001.tar").write_bytes(b"")  # as a download that failed leaves it
    (folder / "00002.tar").write_bytes(b"just some text, not a tar archive" * 40)
    table = lib.build_image_table(webdataset_params(str(folder / "{00000..00002}.tar")))
    assert len(table) == SHARD_SIZE
    printed = capsys.readouterr().out
    assert (
        f"WARNING: 2 shard(s) are no tar archives, and are left out: {folder}/00001.tar (empty file)"
        in printed
    )
    assert "run 01_metadata again before 02_embed starts on this collection" in printed


def test_a_folder_of_shards_skips_hidden_files_and_compressed_shards_are_refused(workspace, tmp_path, images):
    folder = write_files(tmp_path / "shards", dataset_files(images))
    (folder / "._00000.tar").write_bytes(b"\0\5\26\7 AppleDouble")
    assert lib.shards.shard_names(str(folder)) == [str(folder / f"{n:05d}.tar") for n in range(3)]
    with pytest.raises(lib.PipelineError, match=r"compressed shards \(s/00000.tar.gz\).*Decompress them"):
        lib.shards.shard_names("s/{00000..00003}.tar.gz")


def test_a_key_in_two_shards_is_an_error_that_names_both(workspace, tmp_path, images):
    image = list(images.values())[0]
    write_files(tmp_path, {name: webdataset_tar({"same": {"jpg": image}}) for name in ("a.tar", "b.tar")})
    with pytest.raises(lib.PipelineError, match=rf"'same' in {tmp_path}/a.tar and {tmp_path}/b.tar"):
        lib.build_image_table(webdataset_params(str(tmp_path / "{a,b}.tar")))


def test_img2dataset_md5_of_the_original_download_checks_nothing(workspace, tmp_path, images):
    files = dataset_files(images, count=6)
    listing = pd.read_parquet(io.BytesIO(files["00000.parquet"])).assign(md5="0" * 32)
    buffer = io.BytesIO()
    listing.to_parquet(buffer)
    files["00000.parquet"] = buffer.getvalue()
    table = lib.build_image_table(webdataset_params(str(write_files(tmp_path, files) / "00000.tar")))
    assert table["md5"].eq("").all() and table["caption"].str.startswith("a photo ").all()


@pytest.mark.parametrize("damage", ["cut inside a header", "a damaged header"])
def test_a_shard_that_ends_at_a_header_is_named_and_not_kept(
    damage, workspace, tmp_path, images, capsys, monkeypatch
):
    """tarfile stops there without an error: 01 looks at the block where it stopped."""
    keys = list(images)[:4]
    data = webdataset_tar({key: {"jpg": images[key]} for key in keys})
    third = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[2].offset
    if damage == "cut inside a header":
        data = data[: third + 100]
    else:  # its checksum field overwritten
        data = data[: third + 148] + b"99999999" + data[third + 156 :]
    write_files(tmp_path, {"cut.tar": data})
    params = webdataset_params(str(tmp_path / "cut.tar"))
    assert lib.build_image_table(params)["image_id"].tolist() == keys[:2]
    assert "WARNING: 1 shard(s) end part-way, inside a member or a header" in capsys.readouterr().out
    read = []
    original = lib.shards._index_archive
    monkeypatch.setattr(
        lib.shards, "_index_archive", lambda shard, *rest: read.append(shard) or original(shard, *rest)
    )
    lib.build_image_table(params)
    assert read == [str(tmp_path / "cut.tar")], "a cut shard's index is not kept: it is read again"


def truncated_shard(images: dict[str, bytes]) -> tuple[bytes, bytes, list[str]]:
    """A shard of 4 images cut in the middle of its last image, the whole shard, and its keys."""
    keys = list(images)[:4]
    data = webdataset_tar({key: {"jpg": images[key]} for key in keys})
    last = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[-1]
    return data[: last.offset_data + last.size // 2], data, keys


@pytest.mark.parametrize("where", ["disk", "http"])
def test_a_shard_cut_inside_an_image_fails_that_image_and_embeds_the_rest(
    where, collection, tmp_path, images, http_server, tiny_encoder, capsys
):
    data, whole, keys = truncated_shard(images)
    if where == "disk":
        source = str(write_files(tmp_path, {"cut.tar": data}) / "cut.tar")
    else:
        http_server.files["/shards/cut.tar"] = (data, "application/x-tar")
        source = http_server.url("/shards/cut.tar")
    table = save_table(webdataset_params(source), collection)
    assert "WARNING: 1 shard(s) end part-way, inside a member or a header" in capsys.readouterr().out
    run_embed(table, tiny_encoder)
    output = merged_output(collection)
    assert output["image_ids"] == keys[:3]
    assert (output["failed_ids"], output["reasons"]) == ([keys[3]], ["truncated member"])
    if where == "disk":  # the shard fetched again whole: its members are where they were
        (tmp_path / "cut.tar").write_bytes(whole)
        assert run_embed(table, tiny_encoder, retry_failed=True).chunks_retried == 1
        again = merged_output(collection)
        assert again["image_ids"] == keys and again["reasons"] == []


def test_a_shard_server_that_cannot_be_reached_is_an_error_that_names_the_shard(workspace):
    shard = closed_port_url("/shards/00000.tar")
    with pytest.raises(
        lib.PipelineError, match=rf"Cannot read the shard {shard} \(connection error\): check"
    ):
        lib.build_image_table(webdataset_params(shard))


def test_a_shard_gone_after_01_fails_its_images_with_the_reason(collection, tmp_path, images, tiny_encoder):
    folder = write_files(tmp_path / "shards", dataset_files(images))
    table = save_table(webdataset_params(str(folder / "{00000..00002}.tar")), collection)
    (folder / "00002.tar").unlink()
    run_embed(table, tiny_encoder, stop_if_unreachable=False)
    output = merged_output(collection)
    assert len(output["image_ids"]) == 2 * SHARD_SIZE
    assert output["reasons"] == ["file not found"] * SHARD_SIZE


def test_http_shards_are_indexed_once_and_read_by_range_requests(
    workspace, images, http_server, monkeypatch, capsys
):
    for name, data in dataset_files(images).items():
        http_server.files[f"/wds/{name}"] = (data, "application/octet-stream")
    params = webdataset_params(http_server.url("/wds/{00000..00003}.tar"))
    table = lib.build_image_table(params)
    assert table["caption"].str.startswith("a photo ").all()
    missing = http_server.url("/wds/00003.tar")
    assert f"do not exist, and their images are not in the table: {missing}" in capsys.readouterr().out
    fetcher = lib.Fetcher()
    assert [fetcher.fetch(location) for location in table["location"]] == list(images.values())[:18]
    with pytest.raises(lib.ImageFailure, match="range ignored"):
        fetcher.fetch(table["location"][0].replace("/wds/", "/norange/wds/"))
    monkeypatch.setattr(lib.shards, "_index_archive", lambda *arguments: pytest.fail("read again"))
    pd.testing.assert_frame_equal(lib.build_image_table(params), table)  # unchanged ETags: from the cache


def test_fsspec_stores_are_read_by_range_too(workspace, images):
    """Any fsspec URL (memory:// here, gs:// or az:// elsewhere) for the shards and their images."""
    import fsspec

    store = fsspec.filesystem("memory")
    for name, data in dataset_files(images, count=6).items():
        store.pipe_file(f"/wds-test/{name}", data)
    table = lib.build_image_table(webdataset_params("memory://wds-test/00000.tar"))
    assert [lib.Fetcher().fetch(location) for location in table["location"]] == list(images.values())[:6]
    assert table["caption"].str.startswith("a photo ").all()


@pytest.fixture(scope="module")
def shard_bucket(images):
    """A loopback S3 with the 3 shards and their listings in a public-read bucket, and its endpoint."""
    server, endpoint = loopback_s3(
        BUCKET, {f"laion/{name}": data for name, data in dataset_files(images).items()}
    )
    yield endpoint
    server.stop()


def test_a_chain_over_shards_on_s3_gives_the_vectors_of_the_same_images_from_a_folder(
    workspace, shard_bucket, images, tmp_path, tiny_encoder
):
    """Acceptance: 01, 02 and 03 over 3 shards on loopback S3 equal the same images from a folder, to 1e-6."""
    shards = lib.collection("OUTPUT/shards")
    table = save_table(webdataset_params(f"s3://{BUCKET}/laion/{{00000..00002}}.tar", shard_bucket), shards)
    embed_rows(table, tiny_encoder, embed_params(output_dir="OUTPUT/shards", s3_endpoint_url=shard_bucket))
    from_shards = merged_output(shards)
    folder = tmp_path / "images"
    write_files(folder, {f"{key}.jpg": data for key, data in list(images.items())[:18]})
    folders = lib.collection("OUTPUT/folder")
    folder_table = save_table(lib.MetadataParams("folder", "validation", str(folder), "s3"), folders)
    embed_rows(folder_table, tiny_encoder, embed_params(output_dir="OUTPUT/folder"))
    from_folder = merged_output(folders)
    assert from_shards["reasons"] == [] and len(from_shards["image_ids"]) == 18
    assert [key.split("/")[1] for key in from_shards["image_ids"]] == [
        name.removesuffix(".jpg") for name in from_folder["image_ids"]
    ]
    np.testing.assert_allclose(from_shards["embeddings"], from_folder["embeddings"], atol=1e-6, rtol=0)
    assert from_shards["urls"][0] == f"https://images.example/{list(images)[0]}.jpg".encode()


def test_s3_ranges_past_the_end_of_a_shard_fail_as_truncated(shard_bucket):
    fetcher = lib.Fetcher(shard_bucket)
    size = s3_admin(shard_bucket).head_object(Bucket=BUCKET, Key="laion/00000.tar")["ContentLength"]
    shard = f"s3://{BUCKET}/laion/00000.tar"
    assert len(fetcher.fetch(lib.fetch.member_location(shard, size - 100, 100))) == 100
    for offset in (size - 50, size + 10):
        with pytest.raises(lib.ImageFailure, match="truncated member"):
            fetcher.fetch(lib.fetch.member_location(shard, offset, 100))
    with pytest.raises(lib.ImageFailure, match="s3 NoSuchKey"):
        fetcher.fetch(lib.fetch.member_location(f"s3://{BUCKET}/laion/00009.tar", 0, 100))


def test_s3_shards_are_indexed_once_and_a_missing_one_is_named(workspace, shard_bucket, monkeypatch, capsys):
    params = webdataset_params(f"s3://{BUCKET}/laion/{{00000..00003}}.tar", shard_bucket)
    table = lib.build_image_table(params)
    assert len(table) == 18 and f"s3://{BUCKET}/laion/00003.tar" in capsys.readouterr().out
    monkeypatch.setattr(lib.shards, "_index_archive", lambda *arguments: pytest.fail("read again"))
    pd.testing.assert_frame_equal(lib.build_image_table(params), table)


def test_a_bucket_that_refuses_this_machine_is_an_error_that_says_how_it_asked(
    workspace, shard_bucket, images
):
    admin = s3_admin(shard_bucket)
    admin.create_bucket(Bucket="private-shards")
    admin.put_object(
        Bucket="private-shards", Key="00000.tar", Body=dataset_files(images, count=6)["00000.tar"]
    )
    source = "s3://private-shards/00000.tar"
    params = lib.MetadataParams(
        "webdataset", "validation", source, "s3", s3_endpoint_url=shard_bucket, s3_anonymous=True
    )
    with pytest.raises(
        lib.PipelineError,
        match=r"00000.tar \(s3 AccessDenied\): the bucket refuses this machine, which asked anonymously "
        r"\(S3_ANONYMOUS=True\), or it has no such shard",
    ):
        lib.build_image_table(params)
