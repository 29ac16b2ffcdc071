"""02's model step, for OpenAI `.pt` files: their tensors, read as data only, whatever the file holds.

A state dict goes through torch's weights-only unpickler. A TorchScript archive (OpenAI's own form)
goes through one that knows only modules, tensors, lists and dictionaries: torch.jit.load would
compile and run the archive's code. Each record is read once, uncompressed, and the tensors may not
claim more bytes than the file holds, so a crafted file can neither run code nor exhaust memory.
openai_checkpoint maps the tensors onto transformers' CLIPModel.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import PipelineError

_READ_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,  # torch's zip reader, RecursionError
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    zipfile.BadZipFile,
)
_SLACK_BYTES = 1 << 20  # tensors may claim at most the file's size and this


def read_openai_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a `.pt` file, a TorchScript archive or a state dict, and which form it was."""
    size = path.stat().st_size
    if size == 0:
        raise PipelineError(f"MODEL={str(path)!r} is an empty file: copy or download the checkpoint again.")
    try:
        weights, form = _read(path)
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from None
    claimed = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
    if claimed > 2 * size + _SLACK_BYTES:
        raise PipelineError(
            f"MODEL={str(path)!r} is refused: its tensors claim {claimed:,} bytes, more than the file's "
            f"{size:,} could hold, which no checkpoint of weights does. Check where the file came from."
        )
    return weights, form


def _read(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            compressed = [info.filename for info in archive.infolist() if _is_compressed_data(info)]
            if compressed:  # one could inflate without end
                raise ValueError(f"its record {compressed[0]} is compressed, which torch never writes")
            if _is_torchscript(archive):
                return _torchscript_tensors(archive), "TorchScript archive"
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    return _state_dict(loaded, path), "state dict"


def _is_compressed_data(info: zipfile.ZipInfo) -> bool:
    """A record of pickled data or tensors, which torch stores uncompressed, that is compressed."""
    data = info.filename.endswith(".pkl") or "/data/" in info.filename
    return data and info.compress_type != zipfile.ZIP_STORED


def _unreadable(path: Path, error: Exception) -> PipelineError:
    refused = re.search(r"GLOBAL (\S+)|data\.pkl refers to (\S+)", str(error))
    if refused:
        return PipelineError(
            f"MODEL={str(path)!r} is refused: it holds more than plain weights "
            f"({refused.group(1) or refused.group(2)}), and reading that could run code. Where you trust "
            "the file, load it with its own code and save `model.state_dict()` alone with torch.save."
        )
    return PipelineError(
        f"MODEL={str(path)!r} cannot be read as a PyTorch checkpoint ({_first_line(error)}). It may "
        "be truncated (compare its size with the original's) or not a checkpoint at all."
    )


def _first_line(error: Exception) -> str:
    """What went wrong, without torch's advice on weights_only (which is not for users to follow here)."""
    message = str(error)
    detail = re.search(r"WeightsUnpickler error: \s*(.+)", message)
    first = detail.group(1) if detail else message.splitlines()[0] if message else type(error).__name__
    return first.split(". ")[0][:200]


def _state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """A loaded object that must be a flat mapping of names to tensors."""
    if isinstance(loaded, dict) and all(isinstance(value, torch.Tensor) for value in loaded.values()):
        return {str(name): tensor for name, tensor in loaded.items()}
    if isinstance(loaded, dict):
        keys = ", ".join(map(str, list(loaded)[:8]))
        raise PipelineError(
            f"MODEL={str(path)!r} holds a dictionary of more than tensors (keys {keys}), such as a "
            "training checkpoint: save its model's state_dict() alone and use that file."
        )
    raise PipelineError(
        f"MODEL={str(path)!r} holds a {type(loaded).__name__}, not a CLIP state dict or TorchScript archive."
    )


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
    return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _Record:
    """Something data.pkl builds; setting state on it (pickle's BUILD) is refused."""

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"data.pkl sets the state of a {type(self).__name__[1:]}")


class _ScriptModule:
    """A module of a TorchScript archive: the attributes its data.pkl lists, and none of its code."""

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


class _Storage(_Record):
    """One record of the archive's data/ folder, as a flat tensor."""

    def __init__(self, values: torch.Tensor):
        self.values = values


class _Tensor(_Record):
    """A view of a storage that torch._utils._rebuild_tensor_v2 would make."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("data.pkl rebuilds a tensor from something other than a record")
        self.tensor = torch.as_strided(storage.values, size, stride, offset)


def _same(value: Any, *_: Any) -> Any:
    """torch.jit._pickle's builders and type tags: the value itself."""
    return value


_JIT_BUILDERS = (
    "restore_type_tag",
    "build_intlist",
    "build_doublelist",
    "build_boollist",
    "build_tensorlist",
)


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl into modules and tensors; every other global is refused."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _Tensor,
        ("torch._utils", "_rebuild_parameter"): _same,
        ("collections", "OrderedDict"): collections.OrderedDict,
        **{("torch.jit._pickle", name): _same for name in _JIT_BUILDERS},
    }

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(prefix + "data.pkl")))
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__."):
            return _ScriptModule
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[module, name]
        raise pickle.UnpicklingError(f"data.pkl refers to {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"data.pkl names a record it does not describe: {pid!r}")
        _, dtype, key, _location, count = pid  # every location is read onto the CPU
        if str(key) not in self._storages:
            self._storages[str(key)] = _Storage(self._values(dtype, str(key), count))
        return self._storages[str(key)]

    def _values(self, dtype: Any, key: str, count: Any) -> torch.Tensor:
        data = self._archive.read(f"{self._prefix}data/{key}")
        whole = (
            isinstance(dtype, torch.dtype) and isinstance(count, int) and len(data) == count * dtype.itemsize
        )
        if not whole:
            raise ValueError(f"the record data/{key} holds {len(data)} bytes, not {count} values of {dtype}")
        return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.zeros(0, dtype=dtype)


def _torchscript_tensors(archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    """Every tensor attribute of an archive's modules, named by its path as state_dict() names it."""
    prefix = archive.namelist()[0].split("/")[0] + "/"  # torch writes every record under one folder
    names = set(archive.namelist())
    if prefix + "data.pkl" not in names:
        raise ValueError(f"the archive has no {prefix}data.pkl")
    if prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() != b"little":
        raise ValueError("the archive was written on a big-endian machine")  # older torch wrote none
    root = _DataOnlyUnpickler(archive, prefix).load()
    if not isinstance(root, _ScriptModule):
        raise ValueError("its data.pkl holds no TorchScript module")
    return dict(_module_tensors(root))


def _module_tensors(module: _ScriptModule, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in module.attributes.items():
        if isinstance(value, _Tensor):
            yield prefix + name, value.tensor
        elif isinstance(value, _ScriptModule):
            yield from _module_tensors(value, f"{prefix}{name}.")
