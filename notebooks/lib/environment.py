"""00: what this machine offers: the versions that shape the vectors, the device, the free disk."""

from __future__ import annotations

import os
import platform

import torch

from .model import library_versions, resolve_device
from .settings import current_settings
from .workspace import Collection, check_writable, current_workspace


def describe_device(device: str) -> str:
    """The device DEVICE resolves to, in words (GPU name and memory, or the CPU)."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        properties = torch.cuda.get_device_properties(resolved)
        return f"{resolved}: {properties.name}, {properties.total_memory / 2**30:.1f} GiB"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def prepare_folders(collection: Collection) -> dict[str, str]:
    """Create the collection's folder and .cache/, and report the free space of each."""
    report = {}
    for folder in (collection.folder, current_workspace().cache):
        check_writable(folder)
        report[str(folder)] = f"{current_settings().disk_usage(folder).free / 2**30:,.1f} GiB free"
    return report


def describe_environment(device: str, collection: Collection) -> dict[str, str]:
    """Versions, device and free disk: what 00_setup prints."""
    return {
        **library_versions(),
        "device": describe_device(device),
        **prepare_folders(collection),
    }
