"""02 with EXECUTOR='ray': the Ray instance or cluster, and the workers it holds room for.

`connect` joins RAY_ADDRESS or starts a Ray instance on this machine, listening on 127.0.0.1 alone;
`worker_layout` says how many workers the cluster has room for, on which device, with how many cores.
Ray is imported here, when a run asks for it, never by `import lib`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import warnings
from pathlib import Path
from urllib.parse import urlparse

from .errors import ParameterError, PipelineError, first_line
from .settings import cpu_cores

LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local instance binds to 127.0.0.1 alone
CONNECT_SECONDS = 10  # to reach RAY_ADDRESS before Ray itself tries


@dataclasses.dataclass(frozen=True)
class WorkerLayout:
    """The workers a Ray cluster has room for: how many, on which device, and the cores each reserves."""

    device: str  # "cuda" (a GPU each) or "cpu"
    workers: int
    cores: int  # decoding threads, and on the CPU the model's threads

    def __str__(self) -> str:
        each = "a GPU and " if self.device == "cuda" else ""
        return f"{self.workers} Ray worker(s), each with {each}{self.cores} CPU core(s)"


def connect(address: str | None) -> None:
    """Join the Ray cluster at RAY_ADDRESS, or with None start a Ray instance on 127.0.0.1 alone.

    `address` is 'auto', 'host:port' or 'ray://host:port'. Nothing is done when Ray is already up.
    """
    if address is None:
        _keep_on_loopback()
    elif address != "auto":
        _check_reachable(address)
    import ray

    if ray.is_initialized():
        _check_same_cluster(address)
        return
    local = {"num_cpus": cpu_cores()} if address is None else {}  # the cores this process may use
    try:
        ray.init(
            address=address or "local",
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"py_modules": [str(Path(__file__).parent)]},  # lib, for workers on any node
            **local,
        )
    except (ConnectionError, TimeoutError, ValueError) as error:
        raise PipelineError(
            f"RAY_ADDRESS={address!r}: no Ray cluster could be joined there ({first_line(error)}). "
            "Start one (`ray start --head` on its head node), check the address, or set RAY_ADDRESS=None "
            "for a Ray instance on this machine alone."
        ) from None
    _joined["address"] = address


_joined: dict[str, str | None] = {}  # the RAY_ADDRESS that this process's Ray was started with


def _check_same_cluster(address: str | None) -> None:
    """An error when Ray is up in this process for another RAY_ADDRESS (or was started by other code)."""
    if "address" not in _joined:
        warnings.warn(
            "Ray was already started in this process (ray.init) without 02's settings: 02 uses it as it "
            "is, and workers on other nodes may not find this pipeline's code. Restart the kernel to let "
            "02 start or join Ray itself.",
            stacklevel=3,
        )
    elif _joined["address"] != address:
        raise PipelineError(
            f"RAY_ADDRESS={address!r}, but this kernel is on the Ray of RAY_ADDRESS={_joined['address']!r}, "
            "and Ray joins one cluster per process: restart the kernel to change it."
        )


def _keep_on_loopback() -> None:
    """Have the Ray instance about to start listen on 127.0.0.1 alone, as Ray does on macOS and Windows.

    Ray reads the setting when imported, and its processes inherit it; a Ray imported earlier without
    it listens on this machine's network addresses, which is said.
    """
    if "ray" in sys.modules and os.environ.get(LOOPBACK_ONLY) != "0":
        warnings.warn(
            "ray was imported before 02 started its Ray instance, so the instance listens on this machine's "
            f"network addresses, not on 127.0.0.1 alone: set {LOOPBACK_ONLY}=0 before importing ray (or "
            "restart the kernel and leave the import to 02) to keep it to this machine.",
            stacklevel=3,
        )
    os.environ.setdefault(LOOPBACK_ONLY, "0")


def _check_reachable(address: str) -> None:
    """An error within seconds, rather than Ray's minutes of retries, when nothing listens at `address`."""
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise ParameterError(
            f"RAY_ADDRESS={address!r} is not allowed: use 'host:port' (the head node's GCS port, 6379 by "
            "default), 'ray://host:10001' (Ray Client), 'auto', or None for a Ray instance on this machine."
        )
    try:
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise PipelineError(
            f"RAY_ADDRESS={address!r}: nothing answers there ({error.strerror or error}). Start the cluster "
            "(`ray start --head` on its head node), check the address and the firewall, or set "
            "RAY_ADDRESS=None for a Ray instance on this machine alone."
        ) from None


def worker_layout(device: str, cores_per_worker: int | str) -> WorkerLayout:
    """One worker per GPU of the cluster, or per `cores_per_worker` CPU cores where there is none.

    DEVICE='cpu' takes the CPUs whatever GPUs there are. 'auto' cores: the smallest share of a GPU's
    node's cores, or on CPUs the smallest node's cores. A node holds as many workers as fit in it.
    """
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    gpu_nodes = [node for node in nodes if node.get("GPU", 0) >= 1]
    if device == "cpu" or (device == "auto" and not gpu_nodes):
        return _cpu_layout([int(node.get("CPU", 0)) for node in nodes], cores_per_worker)
    if not gpu_nodes:
        raise ParameterError(
            f"DEVICE={device!r}, and the Ray cluster has no GPU ({_resources(nodes)}): add GPU nodes, or "
            "set DEVICE='auto' or 'cpu' to embed on its CPUs."
        )
    share = min(int(node.get("CPU", 0)) // int(node["GPU"]) for node in gpu_nodes)
    cores = max(1, share) if cores_per_worker == "auto" else cores_per_worker
    workers = sum(min(int(node["GPU"]), int(node.get("CPU", 0)) // cores) for node in gpu_nodes)
    if not workers:
        raise ParameterError(
            f"CPUS_PER_WORKER={cores_per_worker!r}: no GPU node of the Ray cluster has {cores} CPU core(s) "
            f"for a worker ({_resources(gpu_nodes)}). Use a smaller CPUS_PER_WORKER, or give its nodes CPUs."
        )
    return WorkerLayout("cuda", workers, cores)


def _cpu_layout(node_cores: list[int], cores_per_worker: int | str) -> WorkerLayout:
    with_cores = [cores for cores in node_cores if cores >= 1]
    if not with_cores:
        raise PipelineError("The Ray cluster has no node with a CPU to run a worker on: add a worker node.")
    cores = min(with_cores) if cores_per_worker == "auto" else cores_per_worker
    workers = sum(node // cores for node in with_cores)
    if not workers:
        raise ParameterError(
            f"CPUS_PER_WORKER={cores}: no node of the Ray cluster has that many CPU cores (the largest has "
            f"{max(with_cores)}). Use a smaller CPUS_PER_WORKER, or 'auto'."
        )
    return WorkerLayout("cpu", workers, cores)


def _resources(nodes: list[dict]) -> str:
    cpus = sum(int(node.get("CPU", 0)) for node in nodes)
    return f"{len(nodes)} node(s), {cpus} CPU core(s)"
