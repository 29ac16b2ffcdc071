"""04's search app (Gradio): text, uploaded image, image URL or image_id queries over a merged file.

Started by 04 with APP=True (shown inline in JupyterLab and Colab) or by `make app EMBEDDINGS=<file>`.
The vectors are held in memory when they fit (see vector_index). A click on a result searches for
images like it; "Download ZIP" gives the shown images with results.csv (see subset).

Safe to leave running: it binds 127.0.0.1 unless HOST says otherwise; the pages show only thumbnails
that it made of the file's images, never a path taken from a request (URL queries are http(s) or
s3); uploads are limited in bytes (MAX_UPLOAD_MB) and pixels (MAX_PIXELS); every string it shows is
text or escaped; Gradio's public share link is made only with SHARE=True.

(No `from __future__ import annotations` here: Gradio reads its event handlers' annotations.)
"""

import dataclasses
import html
import ipaddress
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
from PIL import Image

from .display import result_thumbnails
from .errors import ImageFailure, PipelineError
from .fetch import Fetcher
from .model import ClipEncoder
from .nearest import EmbeddingsFile, image_vector, open_embeddings, query_encoder
from .params import SearchParams
from .subset import results_zip, shown_results
from .vector_index import VectorIndex, hold_vectors
from .workspace import collection

APP_THUMBNAIL_SIZE = 256
MAX_TOP_K = 200
QUERY_URL_SCHEMES = ("http", "https", "s3")
ZIP_KEPT_SECONDS = 600
GRADIO_CACHE_SECONDS = 3600  # Gradio's copies of thumbnails and ZIPs are deleted after this long
NO_RESULTS = pd.DataFrame(columns=["rank", "score", "image_id", "url", "row"])


@dataclasses.dataclass(frozen=True)
class Query:
    """A query as the app searches it: what the user asked for, its vector, and its encoding time."""

    label: str
    vector: np.ndarray
    encoded_ms: float | None = None


@dataclasses.dataclass(frozen=True)
class Shown:
    """What a search shows: gallery items (thumbnail, caption), the status line (HTML), the results."""

    gallery: list[tuple[str, str]]
    status: str
    query: Query | None
    results: pd.DataFrame


class SearchApp:
    """The app's logic, apart from its page: queries of each kind, and the results they show."""

    def __init__(
        self,
        embeddings: EmbeddingsFile,
        encoder: ClipEncoder,
        fetcher: Fetcher,
        index: VectorIndex,
        params: SearchParams,
        downloads: Path,
    ):
        self.embeddings, self.encoder, self.fetcher, self.index = embeddings, encoder, fetcher, index
        self.max_upload_bytes, self.max_pixels = params.max_upload_mb << 20, params.max_pixels
        self.query_fetcher = Fetcher(
            params.s3_endpoint_url, max_bytes=self.max_upload_bytes, s3_anonymous=params.s3_anonymous
        )
        self.downloads = downloads

    def text_query(self, text: str) -> Query:
        """A text through the model's tokenizer and text encoder."""
        if not text or not text.strip():
            raise PipelineError("Type a text to search for.")
        began = time.perf_counter()
        vector = self.encoder.encode_text([text.strip()])[0]
        return Query(f"text {text.strip()!r}", vector, 1000 * (time.perf_counter() - began))

    def upload_query(self, path: str | None) -> Query:
        """An uploaded image, embedded as 02 embedded the file's images, within the upload limits."""
        if not path:
            raise PipelineError("Upload an image to search for images like it.")
        if Path(path).stat().st_size > self.max_upload_bytes:
            raise PipelineError(f"The upload is larger than MAX_UPLOAD_MB={self.max_upload_bytes >> 20}.")
        return self._embedded("the uploaded image", Path(path).read_bytes())

    def reference_query(self, reference: str) -> Query:
        """An image_id of the file (its stored vector), or an image at an http(s) or s3 URL."""
        reference = (reference or "").strip()
        position = self.embeddings.position_of(reference) if reference else None
        if position is not None:
            return Query(f"image_id {reference!r}", self.embeddings.vector(position))
        if urlparse(reference).scheme not in QUERY_URL_SCHEMES:
            raise PipelineError(
                f"{reference!r} is not an image_id of this file, nor an http(s):// or s3:// URL "
                "(the app reads no path on its machine: upload the image instead)."
            )
        try:
            data = self.query_fetcher.fetch(reference)
        except ImageFailure as failure:
            raise PipelineError(f"Cannot fetch {reference!r} ({failure.reason}).") from None
        return self._embedded(repr(reference), data)

    def result_query(self, results: pd.DataFrame, number: int) -> Query:
        """The shown result at `number` (from 0): its stored vector."""
        record = results.iloc[number]
        return Query(
            f"result #{record['rank']} {record['image_id']!r}", self.index.vectors_at([record.name])[0]
        )

    def _embedded(self, label: str, data: bytes) -> Query:
        try:
            vector = image_vector(self.embeddings, self.encoder, data, self.max_pixels)
        except ImageFailure as failure:
            reason = (
                f"more than MAX_PIXELS={self.max_pixels:,}"
                if failure.reason == "too many pixels"
                else failure.reason
            )
            raise PipelineError(f"Cannot embed {label}: {reason}.") from None
        return Query(label, vector)

    def show(self, query: Query, top_k: int, mode: str, hide_near_duplicates: bool) -> Shown:
        """Search for `query` and return what the page shows."""
        top_k = max(1, min(int(top_k), MAX_TOP_K))
        began = time.perf_counter()
        results, hidden = shown_results(self.index, query.vector[None], top_k, mode, hide_near_duplicates)
        searched_ms = 1000 * (time.perf_counter() - began)
        status = self._status(query, len(results), hidden, searched_ms, mode)
        return Shown(self._gallery(results), status, query, results)

    def _status(self, query: Query, count: int, hidden: int, searched_ms: float, mode: str) -> str:
        parts = [f"{query.label}: {count} results"]
        if hidden:
            parts[0] += f" ({hidden} near-duplicate{'s' * (hidden > 1)} of a higher result hidden)"
        if query.encoded_ms is not None:
            parts.append(f"text encoded in {query.encoded_ms:.0f} ms")
        parts.append(f"searched in {searched_ms:.0f} ms ({mode}, {self.index.describe()})")
        return f'<p id="search-status">{html.escape(" · ".join(parts))}</p>'

    def _gallery(self, results: pd.DataFrame) -> list[tuple[str, str]]:
        """(thumbnail file, caption) of each result; an image that cannot be fetched shows a placeholder."""
        files = result_thumbnails(self.embeddings, results, self.fetcher, APP_THUMBNAIL_SIZE)
        return [
            (str(file or self._placeholder()), f"#{record.rank} {record.score:.3f} {record.image_id}")
            for record, file in zip(results.itertuples(), files, strict=True)
        ]

    def _placeholder(self) -> Path:
        path = self.downloads / "not-available.png"
        if not path.is_file():
            Image.new("RGB", (APP_THUMBNAIL_SIZE, APP_THUMBNAIL_SIZE), (224, 224, 224)).save(path)
        return path

    def failed(self, error: PipelineError) -> Shown:
        """What the page shows for a query that cannot be searched: why, and no results."""
        return Shown(
            [], f'<p id="search-status" class="error">{html.escape(str(error))}</p>', None, NO_RESULTS
        )

    def download(self, results: pd.DataFrame) -> str | None:
        """A ZIP of the shown results (see subset.results_zip), or None when none are shown.

        ZIPs older than ZIP_KEPT_SECONDS go (Gradio serves its own copy of each).
        """
        if results is None or results.empty:
            return None
        for earlier in self.downloads.glob("*/*.zip"):
            if time.time() - earlier.stat().st_mtime > ZIP_KEPT_SECONDS:
                shutil.rmtree(earlier.parent, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(dir=self.downloads))
        path = folder / f"{self.embeddings.path.stem}-results.zip"
        return str(results_zip(self.embeddings, results, self.fetcher, path))


def build_page(app: SearchApp, top_k: int) -> Any:
    """The app's page: the query inputs, TOP_K, the index, the near-duplicate toggle, the gallery, the ZIP."""
    import gradio as gr

    title = f"Search {app.embeddings.path.name}"
    cache = (GRADIO_CACHE_SECONDS, GRADIO_CACHE_SECONDS)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=cache) as page:
        gr.HTML(
            f"<h3>{html.escape(str(app.embeddings.path))}</h3>"
            f"<p>{html.escape(app.index.describe())}; queries embedded by "
            f"{html.escape(app.encoder.checkpoint.model_id)}</p>"
        )
        with gr.Row():
            text = gr.Textbox(label="Text query (Enter to search)", elem_id="text-query", scale=3)
            reference = gr.Textbox(
                label="Image URL or image_id (Enter to search)", elem_id="reference-query", scale=2
            )
        with gr.Row():
            upload = gr.Image(
                label="Image query",
                type="filepath",
                sources=["upload"],
                height=180,
                elem_id="upload-query",
            )
            _files_only(upload)
            with gr.Column():
                top_k_slider = gr.Slider(
                    1, MAX_TOP_K, value=min(top_k, MAX_TOP_K), step=1, label="TOP_K", elem_id="top-k"
                )
                mode = gr.Radio(
                    ["exact", "ivf"], value=app.index.default_mode, label="Index", elem_id="index-mode"
                )
                hide = gr.Checkbox(
                    True, label="Hide near-duplicates of a higher result", elem_id="hide-duplicates"
                )
        status = gr.HTML(elem_id="status")
        gallery = gr.Gallery(
            label="Results: click one to search for images like it",
            columns=5,
            allow_preview=False,
            object_fit="contain",
            elem_id="results",
        )
        with gr.Row():
            zip_button = gr.Button("Download the shown images (ZIP)", elem_id="zip-button")
            zip_file = gr.File(label="ZIP", interactive=False, elem_id="zip-file")
        query_state, results_state = gr.State(None), gr.State(NO_RESULTS)
        options = [top_k_slider, mode, hide]
        shown = [gallery, status, query_state, results_state]

        def answer(make_query: Any, *arguments: Any) -> tuple:
            *query_inputs, top_k_value, mode_value, hide_value = arguments
            try:
                result = app.show(make_query(*query_inputs), top_k_value, mode_value, hide_value)
            except PipelineError as error:
                result = app.failed(error)
            gallery_value = gr.Gallery(value=result.gallery, selected_index=None)  # no result stays picked
            return gallery_value, result.status, result.query, result.results

        def on_select(
            results: pd.DataFrame, top_k_value: int, mode_value: str, hide_value: bool, event: gr.SelectData
        ) -> tuple:
            return answer(lambda: app.result_query(results, event.index), top_k_value, mode_value, hide_value)

        def again(query: Query | None, *values: Any) -> tuple:
            if query is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return answer(lambda: query, *values)

        text.submit(lambda *values: answer(app.text_query, *values), [text, *options], shown)
        reference.submit(lambda *values: answer(app.reference_query, *values), [reference, *options], shown)
        upload.upload(lambda *values: answer(app.upload_query, *values), [upload, *options], shown)
        gallery.select(on_select, [results_state, *options], shown)
        for changed in (top_k_slider.release, mode.input, hide.input):  # the slider once let go
            changed(again, [query_state, *options], shown)
        zip_button.click(app.download, results_state, zip_file)
    return page


def _files_only(upload: Any) -> None:
    """Refuse images sent inline (data: URLs), which Gradio decodes whole before any limit: files only.

    A file is limited in bytes by the server (MAX_UPLOAD_MB) and in pixels here, before it is decoded.
    """
    import gradio as gr

    preprocess = upload.preprocess

    def files_only(payload: Any) -> Any:
        if payload is not None and (payload.url or "").startswith("data:"):
            raise gr.Error("The app takes images as file uploads only.")
        return preprocess(payload)

    upload.preprocess = files_only


def launch_app(
    embeddings: EmbeddingsFile,
    encoder: ClipEncoder,
    fetcher: Fetcher,
    params: SearchParams,
    block: bool = False,
) -> Any:
    """Start the search app on HOST:PORT (inline in a notebook); return Gradio's page (`.close()` stops it).

    With `block`, serve until interrupted (the command line).
    """
    import gradio as gr

    index = hold_vectors(embeddings)
    print(index.describe(), flush=True)
    encoder.encode_text(["a photo"])  # the text tower's first call is slow: not the first user's query
    downloads = Path(tempfile.mkdtemp(prefix="clip-search-app-"))
    page = build_page(SearchApp(embeddings, encoder, fetcher, index, params, downloads), params.top_k)
    if not _is_loopback(params.host):
        print(
            f"HOST={params.host!r}: the app is open to every machine that can reach this one there.",
            flush=True,
        )
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    try:
        page.launch(
            server_name=params.host,
            server_port=params.port,
            share=params.share,
            max_file_size=params.max_upload_mb << 20,
            prevent_thread_lock=True,
            footer_links=[],
            ssr_mode=False,
            theme=theme,
            css="#search-status.error { color: #b91c1c; font-weight: 600; }",
            quiet=True,
        )
    except OSError as error:
        raise PipelineError(
            f"Cannot start the search app on {params.host}:{params.port} ({error}): set PORT to a free port, "
            "or PORT=None for the first free one from 7860."
        ) from None
    print(
        f"search app at {page.local_url}" + (f" and {page.share_url}" if page.share_url else ""), flush=True
    )
    if block:
        page.block_thread()  # until Ctrl-C, which closes the server
    return page


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(params: SearchParams) -> None:
    """The command line's app: EMBEDDINGS (or OUTPUT_DIR's merged file), served until interrupted."""
    embeddings = open_embeddings(collection(params.output_dir, params.s3_endpoint_url), params.embeddings)
    fetcher = Fetcher(params.s3_endpoint_url, s3_anonymous=params.s3_anonymous)
    encoder = query_encoder(embeddings, params.model, params.device, params.allow_other_model)
    launch_app(embeddings, encoder, fetcher, params, block=True)
