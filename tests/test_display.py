"""04's gallery: thumbnails fetched where 02 fetched each image, cached, missing ones said so."""

import lib
from conftest import run_embed, save_table


def test_the_gallery_shows_cached_thumbnails_and_says_which_are_missing(merged, workspace, image_folder):
    table = lib.result_table(merged, lib.search(merged, merged.vector(0), 4))
    (image_folder / table["image_id"][3]).unlink()
    page = lib.gallery_html(merged, table, "image: first", lib.Fetcher())
    assert page.count("<img ") == 3 and page.count("(not available)") == 1
    assert len(list((workspace.cache / "thumbnails").glob("*.jpg"))) == 3
    assert f"#1 1.000 {table['image_id'][0]}" in page


def test_thumbnails_come_from_where_02_fetched_relative_paths_included(
    collection, image_folder, tiny_encoder, workspace, tmp_path, monkeypatch
):
    """A listing's relative urls point next to the listing, whatever folder the kernel runs in."""
    photos = sorted(path.name for path in image_folder.glob("*.jpg"))[:4]
    listing = image_folder / "listing.csv"
    listing.write_text("image_id,url\n" + "".join(f"{name},{name}\n" for name in photos))
    table = save_table(lib.MetadataParams("table", "validation", str(listing), "s3"), collection)
    run_embed(table, tiny_encoder)
    embeddings = lib.open_embeddings(collection, lib.merge_chunks(collection).path)
    results = lib.result_table(embeddings, lib.search(embeddings, embeddings.vector(0), 4))
    assert results["url"].tolist()[0] in photos, "the url column keeps the listing's own text"
    monkeypatch.chdir(tmp_path)  # where a kernel may run: not the listing's folder
    page = lib.gallery_html(embeddings, results, "image", lib.Fetcher())
    assert page.count("<img ") == 4 and "(not available)" not in page
    collection.table.unlink()  # without the image table, urls are what there is
    without_table = lib.open_embeddings(collection)
    assert without_table.locations([0], ["images/a.jpg"]) == [str(workspace.root / "images/a.jpg")]
