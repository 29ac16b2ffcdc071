"""02's third step: a CLIP checkpoint on a device, pixels in, L2-normalised float32 embeddings out.

MODEL resolves to files and an identity (hub commit or weights digest) that every output records;
`ClipEncoder` queues batches on the device and halves them when a GPU runs out of memory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import platform
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import PIL
import torch

from .errors import ParameterError, PipelineError
from .onednn import uses_onednn, with_onednn_linears
from .onnx_tower import ONNX_PRECISIONS, OnnxImageTower, cached_tower
from .openai_checkpoint import (
    RESNET_NAMES,
    VIT_NAMES,
    cached_openai_file,
    convert_openai_checkpoint,
    converted_folder,
)
from .preprocess import OPENAI_MEAN, OPENAI_STD, Preprocessing
from .settings import cpu_cores, prepare_process
from .workspace import read_json, resolve_path, sha256_of_file

OPENAI_MODELS = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
_CHECKPOINT_FILES = ["*.json", "*.txt", "*.safetensors"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
# int8: the image tower on ONNX Runtime; the torch model (texts, and the export) stays in float32


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where a model's files are, and what identifies its weights."""

    model_id: str  # a Hugging Face id, the local directory, or the OpenAI .pt file
    revision: str  # the hub commit, or 'sha256:...' of the local weight files
    path: Path  # the transformers directory (an OpenAI file's converted copy)
    openai_file: Path | None = None  # the OpenAI .pt file that `path` is converted from


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(sha256_of_file(path).encode())
    return "sha256:" + digest.hexdigest()


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The files of a hub model: from the local Hugging Face cache, or downloaded into it."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    download = functools.partial(huggingface_hub.snapshot_download, repo_id, revision=revision)
    pinned = f" at revision {revision!r}" if revision else ""
    try:
        folder = Path(download(allow_patterns=_CHECKPOINT_FILES))
        if not any(folder.glob("*.safetensors")):
            folder = Path(download(allow_patterns=["pytorch_model.bin"]))
    except RevisionNotFoundError:
        raise PipelineError(
            f"MODEL_REVISION={revision!r}: the model {repo_id!r} has no such branch, tag or commit on "
            "the Hugging Face hub. Use one listed on the model's page, or None for main."
        ) from None
    except RepositoryNotFoundError:
        raise PipelineError(
            f"MODEL={repo_id!r}: the Hugging Face hub has no such model (or it is private). Use an "
            f"OpenAI name ({', '.join(OPENAI_MODELS)}), a hub id, a local directory or an OpenAI .pt file."
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise PipelineError(
            f"Could not get the model {repo_id!r}{pinned}: the Hugging Face hub ({constants.ENDPOINT}) "
            f"could not be reached ({str(error).splitlines()[0]}) and the model is not in the local "
            f"cache ({constants.HF_HUB_CACHE}). To work offline, copy a cache that holds it (`hf "
            f"download {repo_id}{' --revision ' + revision if revision else ''}` where the hub is "
            "reachable) and point HF_HUB_CACHE at it, or set MODEL to a local directory holding "
            "config.json, preprocessor_config.json and model.safetensors."
        ) from None
    return folder


def resolve_checkpoint(model: str, revision: str | None = None) -> Checkpoint:
    """MODEL as an OpenAI name, a local directory, an OpenAI .pt file or a Hugging Face id -> its files.

    An OpenAI name reads the original notebook's cached `~/.cache/clip/<name>.pt` when that is OpenAI's
    file and no revision is pinned, the hub's copy otherwise. `revision` pins a hub model to a branch,
    tag or commit; the checkpoint records the commit (a local model: the SHA-256 of its weights).
    """
    return _converted(_located(model, revision))


def _converted(checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint, its OpenAI file converted first if it has one (this imports transformers)."""
    if checkpoint.openai_file:
        convert_openai_checkpoint(checkpoint.openai_file, checkpoint.path)
    return checkpoint


def _located(model: str, revision: str | None) -> Checkpoint:
    """Where MODEL's files are and what identifies them: hashing and the hub, nothing converted yet."""
    if model in RESNET_NAMES.values():
        raise ParameterError(
            f"MODEL={model!r} is OpenAI's ResNet CLIP, whose image tower transformers' CLIPModel does not "
            f"have. Use a ViT model ({VIT_NAMES})."
        )
    local = resolve_path(model)
    if model not in OPENAI_MODELS and local.exists():
        if revision is not None:
            raise ParameterError(
                f"MODEL_REVISION={revision!r} applies to hub models, but MODEL={model!r} is a local "
                f"{'directory' if local.is_dir() else 'file'} (identified by its weights' digest). Set "
                "MODEL_REVISION=None."
            )
        if local.is_dir():
            return Checkpoint(str(local), _weights_digest(local), local)
        try:
            return _openai_checkpoint(local, sha256_of_file(local))
        except OSError as error:
            raise PipelineError(f"MODEL={model!r}: {local} cannot be read ({error.strerror}).") from None
    if model.startswith((".", "/", "~")) or local.suffix == ".pt":
        raise PipelineError(
            f"MODEL={model!r}: {local} does not exist. Give an OpenAI .pt checkpoint, a directory holding "
            f"config.json and model.safetensors, an OpenAI name ({', '.join(OPENAI_MODELS)}) or a hub id."
        )
    cached = cached_openai_file(model) if model in OPENAI_MODELS and revision is None else None
    if cached:
        return _openai_checkpoint(*cached)
    repo_id = OPENAI_MODELS.get(model, model)
    folder = _hub_snapshot(repo_id, revision)
    return Checkpoint(repo_id, folder.name, folder)


def _openai_checkpoint(path: Path, digest: str) -> Checkpoint:
    """An OpenAI .pt file, identified by its SHA-256, read from its converted directory."""
    return Checkpoint(str(path), f"sha256:{digest}", converted_folder(digest), openai_file=path)


def resolve_device(device: str) -> torch.device:
    """DEVICE -> a torch device that exists on this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise ParameterError(
                f"DEVICE={device!r} is not available: torch {torch.__version__} sees {count} CUDA "
                "GPU(s) here. Use DEVICE='cpu' or 'auto'."
            )
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """PRECISION 'auto' is fp16 on CUDA (as OpenAI's own loader) and fp32 elsewhere; int8 is the CPU's."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision in ONNX_PRECISIONS and device.type != "cpu":
        raise ParameterError(
            f"PRECISION={precision!r} runs on the CPU (ONNX Runtime), and DEVICE is {device}: set "
            "DEVICE='cpu' for it, or PRECISION='fp16' on the GPU."
        )
    return precision


def _checkpoint_preprocessing(folder: Path, image_size: int) -> Preprocessing:
    """Mean and std from the checkpoint's preprocessor_config.json (OpenAI's when absent)."""
    config = read_json(folder / "preprocessor_config.json")
    mean = tuple(config.get("image_mean", OPENAI_MEAN))
    std = tuple(config.get("image_std", OPENAI_STD))
    return Preprocessing(image_size, mean, std)


def _normalised(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise in float32, whatever precision the model computed in."""
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True)


def openai_text_cleaning(text: str) -> str:
    """A text as OpenAI's tokenizer cleans it before BPE: ftfy's fixes, HTML entities, spaces, lower case."""
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return regex.sub(r"\s+", " ", text).strip().lower()  # regex's \s, as OpenAI's: Unicode white space


class PendingEmbeddings:
    """Embeddings queued on the device; `result()` waits for them (on the CPU they are ready)."""

    def __init__(self, parts: list[torch.Tensor], ready: torch.cuda.Event | None):
        self._parts = parts
        self._ready = ready

    def result(self) -> np.ndarray:
        """The (B, D) float32 embeddings, once the device has finished them."""
        if self._ready is not None:
            self._ready.synchronize()
        return np.concatenate([part.numpy() for part in self._parts])


class ClipEncoder:
    """A CLIP model on a device: preprocessed pixels in, L2-normalised float32 embeddings out.

    Without a `model`, the torch model is loaded when first needed: an encoder whose images go
    through an ONNX `image_tower` needs it only for texts.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        precision: str,
        model: Any | None = None,
    ):
        if model is not None:
            self.model = model
        self.checkpoint = checkpoint
        self.device = device
        self.precision = precision
        self.dtype = _DTYPES[precision]
        self.image_tower: OnnxImageTower | None = None  # images through ONNX Runtime, not the torch model
        self.config = model.config if model is not None else _clip_config(checkpoint.path)
        self.preprocessing = _checkpoint_preprocessing(checkpoint.path, self.config.vision_config.image_size)
        self.batch_limit: int | None = None  # set when the GPU ran out of memory on a bigger batch
        self.on_workers = False  # True: it describes the encoder that Ray workers load, each for itself

    @functools.cached_property
    def model(self) -> Any:
        """The transformers CLIPModel, on the device in the precision's dtype."""
        return _clip_model(self.checkpoint.path, self.device, self.dtype)

    @property
    def embedding_size(self) -> int:
        return self.config.projection_dim

    @property
    def runtime(self) -> str:
        """What computes the image embeddings, with its version."""
        if self.image_tower:
            return self.image_tower.runtime
        linears = ", Linear layers on oneDNN" if uses_onednn(self.device, self.dtype) else ""
        return f"torch {torch.__version__}{linears}"

    @property
    def context_length(self) -> int:
        """Tokens the text model reads (77 for OpenAI's models); longer texts are truncated."""
        return self.config.text_config.max_position_embeddings

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The checkpoint's own tokenizer."""
        from transformers import AutoTokenizer

        folder = self.checkpoint.path
        # without these files transformers builds an empty tokenizer instead of failing
        if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
            raise self._no_tokenizer("it has no tokenizer files")
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as error:
            raise self._no_tokenizer(str(error).splitlines()[0]) from None

    def _no_tokenizer(self, problem: str) -> PipelineError:
        return PipelineError(
            f"The model {self.checkpoint.model_id} has no usable tokenizer in {self.checkpoint.path} "
            f"({problem}): text embeddings need its tokenizer files (tokenizer.json, or vocab.json "
            "and merges.txt)."
        )

    def encode(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embeddings (B, D) of preprocessed pixels (B, 3, n_px, n_px), normalised in float32."""
        return self.start_encoding(pixels).result()

    def start_encoding(self, pixels: np.ndarray | torch.Tensor) -> PendingEmbeddings:
        """Queue the embeddings of a non-empty batch; on CUDA this returns before the GPU is done.

        A CUDA out-of-memory error halves the batch, warns once, and goes on with the smaller size.
        """
        while True:
            step = min(len(pixels), self.batch_limit or len(pixels))
            try:
                parts = [self._launch(pixels[low : low + step]) for low in range(0, len(pixels), step)]
            except torch.cuda.OutOfMemoryError:
                self._halve_batch(step)
                continue
            ready = torch.cuda.Event() if self.device.type == "cuda" else None
            if ready is not None:
                ready.record(torch.cuda.current_stream(self.device))
            return PendingEmbeddings(parts, ready)

    def _launch(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Queue a batch's copy to the device, its forward pass, and the copy of its embeddings back.

        A tensor may already be on the device (JPEGs decoded there).
        """
        if self.image_tower:
            return _normalised(torch.from_numpy(self.image_tower(np.asarray(pixels))))
        batch = torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()  # page-locked host memory: the copy below is asynchronous
        batch = batch.to(self.device, self.dtype, non_blocking=True)
        with torch.inference_mode():
            features = _normalised(self.model.get_image_features(pixel_values=batch).pooler_output)
        return features.to("cpu", non_blocking=True)  # into pinned memory from CUDA; ready at the event

    def _halve_batch(self, failed: int) -> None:
        if failed == 1:
            raise PipelineError(
                f"{self.device} ran out of memory on a single image with {self.checkpoint.model_id} in "
                f"{self.precision}: free the GPU (other processes, other notebooks' models) or use a "
                "smaller PRECISION such as 'fp16'."
            )
        if self.batch_limit is None:
            warnings.warn(
                f"{self.device} ran out of memory on a batch of {failed} images: going on with smaller "
                "batches. Lower GPU_BATCH_SIZE to avoid the retries.",
                stacklevel=3,
            )
        self.batch_limit = (failed + 1) // 2
        torch.cuda.empty_cache()

    @functools.cached_property
    def cleans_like_openai(self) -> bool:
        """Whether texts are cleaned as OpenAI's tokenizer cleans them: for CLIP's own BPE tokenizer."""
        from transformers import CLIPTokenizer

        return isinstance(self.tokenizer, CLIPTokenizer)

    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Embeddings (N, D) of texts, truncated to the context length, normalised in float32."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.cleans_like_openai:
            texts = [openai_text_cleaning(text) for text in texts]
        vectors = [np.zeros((0, self.embedding_size), np.float32)]
        for low in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                texts[low : low + batch_size],
                padding=True,
                truncation=True,
                max_length=self.context_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                vectors.append(
                    _normalised(self.model.get_text_features(**tokens).pooler_output).cpu().numpy()
                )
        return np.concatenate(vectors)

    def signature(self) -> dict:
        """What must match for two runs' vectors to be mixed in one file."""
        return {
            "model_revision": self.checkpoint.revision,
            "embedding_size": self.embedding_size,
            **self.preprocessing.describe(),
            "precision": self.precision,
        }


def load_encoder(
    model: str, device: str = "auto", precision: str = "auto", revision: str | None = None
) -> ClipEncoder:
    """Load a CLIP checkpoint onto DEVICE in PRECISION (see resolve_checkpoint for MODEL forms)."""
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    on_onnx = precision in ONNX_PRECISIONS
    checkpoint = _checked_checkpoint(model, revision, models=not on_onnx)
    prepare_process(cpu_inference=torch_device.type == "cpu")
    if on_onnx:
        return _onnx_encoder(checkpoint, torch_device, precision)
    return ClipEncoder(
        checkpoint, torch_device, precision, _clip_model(checkpoint.path, torch_device, _DTYPES[precision])
    )


def described_encoder(
    model: str, device: torch.device, precision: str = "auto", revision: str | None = None
) -> ClipEncoder:
    """The encoder that workers on `device` load (Ray's, on other machines say), without its weights.

    It has the checkpoint, shapes, preprocessing and precision; the weights load only for a text.
    """
    precision = resolve_precision(precision, device)
    encoder = ClipEncoder(_checked_checkpoint(model, revision, models=False), device, precision)
    encoder.on_workers = True
    return encoder


def _checked_checkpoint(model: str, revision: str | None, models: bool) -> Checkpoint:
    """MODEL's checkpoint, converted if it is an OpenAI file, and checked to be a CLIP folder."""
    with ThreadPoolExecutor(1, thread_name_prefix="checkpoint") as pool:
        # hashing a local checkpoint, or reading the hub, leaves a core free for the import
        located = pool.submit(_located, model, revision)
        _import_transformers(models)
        checkpoint = _converted(located.result())  # after the import: transformers' is not thread-safe
    _check_clip_folder(model, checkpoint.path)
    return checkpoint


def _import_transformers(models: bool) -> None:
    """Import what the encoder needs of transformers: its models, or its configuration alone."""
    if models:
        from transformers import CLIPModel  # noqa: F401
    else:
        from transformers import CLIPConfig  # noqa: F401


def _check_clip_folder(model: str, folder: Path) -> None:
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type != "clip":
        raise PipelineError(
            f"MODEL={model!r} ({folder}) is not a CLIP checkpoint: its config.json says "
            f"model_type={model_type!r}. Use a CLIP model such as 'ViT-B/32'."
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise PipelineError(f"MODEL={model!r}: {folder} holds no weights (*.safetensors or *.bin).")


def _clip_model(folder: Path, device: torch.device, dtype: torch.dtype, onednn: bool = True) -> Any:
    """The transformers CLIPModel on `device` in `dtype`; fp32 on a CPU with oneDNN's Linear layers."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(folder, dtype=torch.float32).to(device, dtype).eval()
    return with_onednn_linears(clip) if onednn and uses_onednn(device, dtype) else clip


def _clip_config(folder: Path) -> Any:
    from transformers import CLIPConfig

    return CLIPConfig.from_pretrained(folder)


def _onnx_encoder(checkpoint: Checkpoint, device: torch.device, precision: str) -> ClipEncoder:
    """An encoder whose images go through ONNX Runtime; the torch model loads only to export, or for texts."""
    encoder = ClipEncoder(checkpoint, device, precision)
    exportable = functools.partial(_clip_model, checkpoint.path, device, torch.float32, onednn=False)
    tower = cached_tower(exportable, weights_digest(checkpoint), precision)
    encoder.image_tower = OnnxImageTower(tower, cpu_cores())
    return encoder


def weights_digest(checkpoint: Checkpoint) -> str:
    """The SHA-256 of a checkpoint's weights: its revision, or its weight files' digest for a hub model."""
    if checkpoint.revision.startswith("sha256:"):
        return checkpoint.revision
    return _weights_digest(checkpoint.path)


_HUB_COMMIT = re.compile(r"[0-9a-f]{40}")


def recorded_commit(recorded: dict, model: str) -> str | None:
    """The hub commit that a file made by MODEL records (a chunk's or a merged file's attributes), if any."""
    recorded_model = recorded.get("model")
    same_name = OPENAI_MODELS.get(recorded_model, recorded_model) == OPENAI_MODELS.get(model, model)
    revision = str(recorded.get("model_revision"))
    return revision if same_name and _HUB_COMMIT.fullmatch(revision) else None


def library_versions() -> dict:
    """Versions of what shapes the vectors, recorded in every file."""
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "h5py": h5py.__version__,
    }
