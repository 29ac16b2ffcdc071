"""02's image tower on ONNX Runtime: exported once per checkpoint, quantised to int8, kept in .cache/onnx/.

`cached_tower` exports a CLIP model's image features (`get_image_features`) to ONNX, checks the
export against torch, and quantises it dynamically to int8 (weights int8, activations quantised per
batch); files are keyed by the weights' digest and written whole. `OnnxImageTower` runs one with the
machine's cores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PipelineError
from .workspace import current_workspace

ONNX_PRECISIONS = ("int8",)  # what 02 computes with ONNX Runtime (on the CPU)
EXPORT_TOLERANCE = 1e-5  # largest difference from torch allowed of an export's normalised features
_OPSET = 18


def tower_file(weights_digest: str, precision: str) -> Path:
    """Where the image tower of the weights with this digest ('sha256:...') lies in `precision`."""
    folder = current_workspace().cache / "onnx" / weights_digest.removeprefix("sha256:")
    return folder / f"image-{precision}.onnx"


def cached_tower(load_clip: Callable[[], Any], weights_digest: str, precision: str) -> Path:
    """The ONNX file of a CLIP image tower in `precision` ('fp32' or 'int8'), made once and then reused.

    `load_clip` gives the transformers CLIPModel of those weights, in float32 on the CPU; it is
    called only when the tower has to be exported.
    """
    path = tower_file(weights_digest, precision)
    if path.is_file():
        return path
    exported = tower_file(weights_digest, "fp32")
    if not exported.is_file():
        print(f"Exporting the image tower to ONNX, once for these weights: {exported.parent}")
        clip = load_clip()
        _write_whole(exported, lambda staging: _export(clip, staging))
    if precision == "int8":
        print("Quantising it to int8 (dynamic quantisation of its weights), once")
        _write_whole(path, lambda staging: _quantise(exported, staging))
    return path


def _write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """write(staging) makes a file beside `path`, then renamed to it: a file of that name is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".onnx")
    os.close(handle)
    try:
        write(Path(staging))
        os.replace(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)


def _export(clip: Any, path: Path) -> None:
    """Export `clip`'s image features for any batch size and check them against torch's."""
    size = clip.config.vision_config.image_size
    tower = _ImageFeatures(clip).eval()
    sample = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        program = torch.onnx.export(
            tower,
            (sample,),
            input_names=["pixel_values"],
            output_names=["features"],
            dynamo=True,
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
            opset_version=_OPSET,
            verbose=False,
        )
        program.save(str(path), external_data=False)
    except Exception as error:  # the exporter fails in many ways, none of them the user's to fix
        raise PipelineError(
            f"The image tower of {clip.name_or_path} could not be exported to ONNX ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}): PRECISION='int8' needs it. Use "
            "PRECISION='fp32'."
        ) from None
    with torch.inference_mode():
        expected = _unit(tower(sample).numpy())
    difference = float(np.abs(_unit(OnnxImageTower(path, threads=1)(sample.numpy())) - expected).max())
    if difference > EXPORT_TOLERANCE:
        raise PipelineError(
            f"The ONNX export of {clip.name_or_path}'s image tower differs from torch by {difference:.2g} "
            f"(more than {EXPORT_TOLERANCE}): it is not used. Use PRECISION='fp32'."
        )


def _unit(features: np.ndarray) -> np.ndarray:
    return features / np.linalg.norm(features, axis=-1, keepdims=True)


def _quantise(exported: Path, path: Path) -> None:
    """Dynamic int8 quantisation: int8 weights; activations scaled by each input's own range as it comes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime logs advice to run its shape pre-processing, which a transformer export does not need
    quantisation_log = logging.getLogger()
    level = quantisation_log.level
    quantisation_log.setLevel(logging.ERROR)
    try:
        quantize_dynamic(exported, path, weight_type=QuantType.QInt8)
    finally:
        quantisation_log.setLevel(level)


class _ImageFeatures(torch.nn.Module):
    """CLIPModel.get_image_features as a module of one tensor in and one out, as ONNX export takes it."""

    def __init__(self, clip: Any):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.get_image_features(pixel_values=pixel_values).pooler_output


class OnnxImageTower:
    """An exported image tower run by ONNX Runtime on the CPU: pixels (B, 3, n, n) in, features out.

    Each image is a run of its own, `threads` of them at once, one core each: dynamic quantisation
    scales activations over the whole input, so only an image alone gets the same vector in any batch
    (benchmarks/int8_runs.py measures what that costs against batches).
    """

    def __init__(self, path: Path, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own, unexported, exception types
            raise PipelineError(
                f"{path} cannot be loaded by ONNX Runtime ({str(error).splitlines()[0]}): delete it, and "
                "02 exports the image tower again."
            ) from None
        self._runs = ThreadPoolExecutor(threads, thread_name_prefix="onnxruntime")
        self.runtime = f"onnxruntime {onnxruntime.__version__}"

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """The image features (B, D) of a batch, in float32, each image computed alone."""
        pixels = np.ascontiguousarray(pixels, np.float32)
        return np.concatenate(list(self._runs.map(self._features, np.split(pixels, len(pixels)))))

    def _features(self, image: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"pixel_values": image})[0]
