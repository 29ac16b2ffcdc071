"""EXECUTOR='ray': a Ray instance on 127.0.0.1, two workers on two cores, and their faults.

The merged file of a Ray run equals a local run's, bit for bit; a worker killed mid-chunk (found by
the pid its claim records) and a driver killed mid-run both end with every row exactly once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import lib
import pytest
import torch
from conftest import assert_same_output, closed_port_url, embed_params, merged_output, save_table
from test_kill import descendants
from test_notebooks import EMBED, papermill
from workload import embed_rows

os.environ[lib.cluster.LOOPBACK_ONLY] = "0"  # before Ray is imported: it reads it then
ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ray-key", "AWS_SECRET_ACCESS_KEY": "ray-secret"}


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Path]:
    """A Ray instance of this test process, on 127.0.0.1 with 2 CPUs; no process of it outlives it."""
    folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a limit
    environment = {"RAY_TMPDIR": str(folder), **S3_CREDENTIALS}  # what the workers inherit
    os.environ.update(environment)
    lib.cluster.connect(None)
    try:
        yield folder
    finally:
        ray.shutdown()
        for name in environment:
            del os.environ[name]
        assert wait_for(lambda: not ray_processes(folder), 30), ray_processes(folder)
        shutil.rmtree(folder, ignore_errors=True)


def ray_processes(folder: Path) -> list[int]:
    """Processes whose command line names the Ray instance's folder (its services and workers)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(folder).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def ray_params(checkpoint: Path, **overrides) -> lib.EmbedParams:
    """02's parameters for two Ray workers of one core each, with the tiny model's folder."""
    values = dict(executor="ray", cpus_per_worker=1, num_workers=1, model=str(checkpoint), chunk=4)
    return embed_params(**{**values, **overrides})


def run_02(collection: lib.workspace.Collection, params: lib.EmbedParams) -> lib.executor.RunSummary:
    """02 as its notebook runs it: the encoder (described, with Ray), the plan, the chunks."""
    encoder = lib.run_encoder(params, collection)
    table = lib.load_image_table(collection)
    return embed_rows(table, encoder, lib.with_machine_sizes(params, encoder))


@pytest.fixture
def local_output(table, tiny_checkpoint, collection) -> dict:
    """The merged file that EXECUTOR='local' makes of the test table, on one core as each Ray worker.

    A matrix product's sums are split by thread, so float32 vectors depend on the thread count.
    """
    with torch_threads(1):
        run_02(collection, ray_params(tiny_checkpoint, executor="local"))
    return merged_output(collection)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads in this process, for a block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def other_collection(name: str, collection: lib.workspace.Collection) -> lib.workspace.Collection:
    """Another collection with a copy of the image table."""
    other = lib.collection(name)
    other.folder.mkdir(parents=True)
    shutil.copy(collection.table, other.table)
    return other


def test_a_ray_run_makes_the_file_a_local_run_makes(
    ray_instance, local_output, tiny_checkpoint, collection, capsys
):
    ray_collection = other_collection("RAY", collection)
    summary = run_02(ray_collection, ray_params(tiny_checkpoint, output_dir="RAY"))
    printed = capsys.readouterr().out
    assert "Starting 2 of 2 Ray worker(s), each with 1 CPU core(s)" in printed
    assert summary.chunks_written == 5 and summary.embedded == 18
    assert summary.failed_by_reason.total() == 2
    assert_same_output(merged_output(ray_collection), local_output)
    again = run_02(ray_collection, ray_params(tiny_checkpoint, output_dir="RAY", retry_failed=True))
    assert (again.chunks_retried, again.retried, again.recovered) == (1, 2, 0)
    assert_same_output(merged_output(ray_collection), local_output)


def test_ray_workers_write_a_collection_on_object_storage(
    ray_instance, local_output, tiny_checkpoint, collection, s3_endpoint
):
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="ray-out")
    remote = lib.collection("s3://ray-out/collection", s3_endpoint)
    remote.folder.mkdir(parents=True)
    lib.storage.push(remote, Path(shutil.copy(collection.table, remote.table)))
    shutil.rmtree(remote.folder)  # the workers' chunks reach the driver through the bucket alone
    params = ray_params(tiny_checkpoint, output_dir=remote.name, s3_endpoint_url=s3_endpoint)
    assert run_02(remote, params).chunks_written == 5
    shutil.rmtree(remote.folder)
    assert_same_output(merged_output(remote), local_output)


def test_chunks_that_wait_for_proof_of_a_way_to_the_images_are_written_by_their_workers(
    ray_instance, collection, tiny_checkpoint, tmp_path, fast_retries
):
    """Fewer failed attempts than the reachability check's limit: the held chunks are written at the end."""
    listing = tmp_path / "unreachable.csv"
    urls = [closed_port_url(f"/{index}.jpg") for index in range(12)]
    listing.write_text("image_id,url\n" + "".join(f"{index},{url}\n" for index, url in enumerate(urls)))
    save_table(lib.MetadataParams("table", "validation", str(listing), "url"), collection)
    summary = run_02(collection, ray_params(tiny_checkpoint))
    assert summary.chunks_written == 3 and summary.failed_by_reason == {"connection error": 12}
    assert sum(info.failed for info in lib.find_chunks(collection.chunks)) == 12


@pytest.fixture
def slow_table(http_server, collection, tmp_path, monkeypatch) -> lib.table.ImageTable:
    """12 rows of images that the loopback server sends after 0.3 s each: a chunk takes a while."""
    monkeypatch.setattr(http_server, "slow_seconds", 0.3)
    ids = [f"{index:016x}" for index in range(12)]
    listing = tmp_path / "listing.csv"
    listing.write_text(
        "image_id,url\n" + "".join(f"{key},{http_server.url(f'/slow/images/{key}.jpg')}\n" for key in ids)
    )
    return save_table(lib.MetadataParams("table", "validation", str(listing), "url"), collection)


def claim_holders(folder: Path) -> list[int]:
    """The pids that the chunk claims in `folder` record ("pid 12 on host since ...")."""
    pids = []
    for claim in folder.glob("chunk_*.h5.lock"):
        holder = lib.claims.lock_holder(claim)
        if holder:
            pids.append(int(holder.split()[1]))
    return pids


def test_a_worker_killed_mid_chunk_is_replaced_and_every_row_is_embedded_once(
    ray_instance, slow_table, tiny_checkpoint, collection, capsys
):
    local = other_collection("LOCAL", collection)
    with torch_threads(1):
        run_02(local, ray_params(tiny_checkpoint, output_dir="LOCAL", executor="local"))
    expected = merged_output(local)
    outcome: dict = {}
    run = threading.Thread(
        target=lambda: outcome.update(summary=run_02(collection, ray_params(tiny_checkpoint))), daemon=True
    )
    run.start()
    assert wait_for(lambda: claim_holders(collection.chunks), 60), "no worker claimed a chunk"
    victim = claim_holders(collection.chunks)[0]
    os.kill(victim, signal.SIGKILL)
    run.join(timeout=180)
    assert not run.is_alive()
    printed = capsys.readouterr().out
    assert f"(pid {victim} on " in printed and "was lost during rows [" in printed
    assert outcome["summary"].embedded == 12
    assert_same_output(merged_output(collection), expected)


DRIVER = """
import sys
from pathlib import Path
import conftest, lib, test_ray  # conftest puts lib on the path
lib.configure(root=Path(sys.argv[1]))
test_ray.run_02(lib.collection(), test_ray.ray_params(Path(sys.argv[2])))
"""


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_driver_killed_mid_run_leaves_chunks_that_the_next_run_resumes(
    ray_instance, slow_table, tiny_checkpoint, collection, workspace
):
    local = other_collection("LOCAL", collection)
    with torch_threads(1):
        run_02(local, ray_params(tiny_checkpoint, output_dir="LOCAL", executor="local"))
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp")}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(workspace.root), str(tiny_checkpoint)],
        cwd=Path(__file__).parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_for(lambda: lib.find_chunks(collection.chunks) or driver.poll() is not None, 120)
    processes = descendants(driver.pid)
    driver.kill()
    assert driver.wait() == -signal.SIGKILL, driver.stderr.read()
    workers = [pid for pid in processes if command_line(pid).startswith("ray::ChunkWorker")]
    assert workers, [command_line(pid) for pid in processes]
    assert wait_for(lambda: not any(command_line(pid) for pid in workers), 30), (
        "its workers outlive the driver"
    )
    written = len(lib.find_chunks(collection.chunks))
    assert written < 3
    summary = run_02(collection, ray_params(tiny_checkpoint))
    assert summary.chunks_skipped == written and summary.chunks_written == 3 - written
    assert_same_output(merged_output(collection), merged_output(local))
    for pid in processes:  # Ray's agents notice their raylet's death only within minutes
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def listening_addresses(pids: list[int]) -> set:
    """The local addresses of the TCP sockets that these processes listen on (Linux /proc)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addresses.add(ip_address(fields[1].split(":")[0]))
    return addresses


def ip_address(hexadecimal: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp writes it (little-endian 32-bit words); IPv4 in IPv6 as IPv4."""
    words = bytes.fromhex(hexadecimal)
    address = ipaddress.ip_address(b"".join(words[i : i + 4][::-1] for i in range(0, len(words), 4)))
    return getattr(address, "ipv4_mapped", None) or address


def test_the_local_ray_instance_listens_on_loopback_alone(ray_instance):
    ray_services = descendants(os.getpid())
    ray_folder = str(Path(ray.__file__).parent)
    assert any(command_line(pid).startswith(("ray::", ray_folder)) for pid in ray_services)
    addresses = listening_addresses(ray_services)
    assert addresses and all(address.is_loopback for address in addresses), addresses


def test_the_workers_fit_the_cluster(ray_instance):
    assert str(lib.cluster.worker_layout("auto", "auto")) == "1 Ray worker(s), each with 2 CPU core(s)"
    assert lib.cluster.worker_layout("cpu", 1).workers == 2
    with pytest.raises(lib.ParameterError, match="CPUS_PER_WORKER=4: no node of the Ray cluster has that"):
        lib.cluster.worker_layout("auto", 4)
    with pytest.raises(lib.ParameterError, match="DEVICE='cuda', and the Ray cluster has no GPU"):
        lib.cluster.worker_layout("cuda", "auto")


def test_a_worker_that_cannot_load_the_model_stops_the_run_with_why(ray_instance, table, tiny_checkpoint):
    broken = Path(str(tiny_checkpoint) + "-weights-elsewhere")
    shutil.copytree(tiny_checkpoint, broken)
    encoder = lib.run_encoder(ray_params(broken), lib.collection())
    for weights in broken.glob("*.safetensors"):
        weights.unlink()  # after the driver looked: the workers find none
    plan = lib.plan_run(ray_params(broken), lib.collection(), encoder, table)
    with pytest.raises(lib.PipelineError, match="holds no weights"):
        lib.embed_chunks(table, encoder, plan, ray_params(broken))
    assert not lib.find_chunks(lib.collection().chunks)


def test_an_address_where_nothing_listens_is_an_error_within_seconds():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    began = time.monotonic()
    with pytest.raises(lib.PipelineError, match=f"RAY_ADDRESS='{address}': nothing answers there"):
        lib.cluster.connect(address)
    assert time.monotonic() - began < 15
    with pytest.raises(lib.ParameterError, match="RAY_ADDRESS='head-node' is not allowed: use 'host:port'"):
        lib.cluster.connect("head-node")


def test_02_headless_on_a_ray_instance_of_its_own(repo, kernel_env, image_folder, tiny_checkpoint):
    """papermill's kernel starts Ray, two workers embed, and Ray stops with the kernel."""
    instance = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**kernel_env, "RAY_TMPDIR": instance}
    papermill(repo, "01_metadata", {"DATASET": "folder", "SOURCE": str(image_folder)}, env)
    embed = {**EMBED, "CHUNK": 8, "GPU_BATCH_SIZE": "auto", "NUM_WORKERS": "auto"}
    printed = papermill(repo, "02_embed", {**embed, "EXECUTOR": "ray", "CPUS_PER_WORKER": 1}, env)
    assert "EXECUTOR='ray': 2 Ray worker(s), each with 1 CPU core(s)" in printed
    assert "images per forward pass: sized by each Ray worker; decoding threads: sized by each" in printed
    assert re.search(r"Ray worker [12] \(pid \d+ on .*\) is up, on cpu", printed)
    assert "chunks written: 3, already done: 0" in printed and "embedded: 18, failed: 2" in printed
    assert wait_for(lambda: not ray_processes(Path(instance)), 30), ray_processes(Path(instance))
    shutil.rmtree(instance, ignore_errors=True)


def test_a_worker_that_ray_started_again_says_so_until_it_is_given_the_run():
    with pytest.raises(lib.ray_worker.NotStarted, match="started this worker again after it died"):
        lib.ray_worker.ChunkWorker().embed(1, False, 0, 4)


def test_a_cluster_of_gpu_nodes_holds_the_workers_that_fit_in_each(monkeypatch):
    nodes = [
        {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 8.0}},
        {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 2.0}},
        {"Alive": True, "Resources": {"CPU": 8.0}},
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    layout = lib.cluster.worker_layout("auto", "auto")
    assert str(layout) == "10 Ray worker(s), each with a GPU and 2 CPU core(s)"
    assert lib.cluster.worker_layout("cuda", 4).workers == 4 + 1
    with pytest.raises(lib.ParameterError, match="no GPU node of the Ray cluster has 32 CPU core"):
        lib.cluster.worker_layout("auto", 32)
    assert str(lib.cluster.worker_layout("cpu", "auto")) == "7 Ray worker(s), each with 4 CPU core(s)"


def test_ray_joins_one_cluster_per_process(ray_instance):
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        with pytest.raises(lib.PipelineError, match="this kernel is on the Ray of RAY_ADDRESS=None"):
            lib.cluster.connect(address)
