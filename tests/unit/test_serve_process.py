"""fashion-serve as a process (issue 19): a taken port is one line and exit 2 before anything loads; SIGTERM
lets an in-flight request finish, then the server and every worker process are gone; a server killed with
SIGKILL takes its workers with it.

Before: a second server on a taken port loaded the model, logged "serving on", then exited 3; SIGTERM left
the ~1 GB worker process orphaned. The index here is built by a tiny real model (the worker loads its
artefact as in production), so a photo query runs a real forward pass in a real worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from test_model_trust import NET, OPTIMIZER, PARAM_GROUPS, SCHEDULER, VOCABS
from test_recommender import catalog, png_bytes  # noqa: F401 (fixture)

from fashion_lightning.models.artifact import save_artifact
from fashion_lightning.models.multitask_module import MultiTaskModule
from fashion_lightning.retrieval import build_index
from fashion_lightning.retrieval.manifest import model_record

pytestmark = pytest.mark.slow  # a server with a worker process: ~20-60 s to start on a busy 2-core box


@pytest.fixture(scope="module")
def index_dir(catalog, tmp_path_factory) -> Path:  # noqa: F811 (imported fixture)
    """A self-contained index folder: a tiny real model's artefact in ``<index>/model`` and its vectors."""
    frame, images = catalog
    root = tmp_path_factory.mktemp("serve_process") / "index"
    root.mkdir()
    torch.manual_seed(0)
    module = MultiTaskModule(NET, VOCABS, optimizer=OPTIMIZER, scheduler=SCHEDULER, param_groups=PARAM_GROUPS).eval()
    folder = save_artifact(module, root / "model")
    with torch.inference_mode():
        vectors = module.embed_images(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).float().numpy()
    build_index(vectors, frame, root, {"embedding_name": module.embedding_name, **model_record(folder, root)})
    return root


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(index_dir: Path, port: int, tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "FASHION_LIGHTNING_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "fashion_lightning.apps.serve", f"index_dir={index_dir}", f"port={port}"]
    command += [f"hydra.run.dir={tmp_path / 'run'}", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def _wait_healthy(server: subprocess.Popen, port: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _get(f"http://127.0.0.1:{port}/health") != 200:
        assert server.poll() is None, server.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "fashion-serve did not become healthy"
        time.sleep(0.5)


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the worker processes and multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _gone(pids: list[int], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie is dead, waiting for its (test) parent to reap it
                    alive.append(pid)
            except (ProcessLookupError, FileNotFoundError):
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _multipart(png: bytes) -> tuple[bytes, bytes]:
    boundary = "fashionservetest"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="p.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /recommend/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    return head, body


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_drains_then_stops_the_server_and_its_workers(index_dir, catalog, tmp_path):  # noqa: F811
    _, images = catalog
    port = _free_port()
    server = _serve(index_dir, port, tmp_path)
    try:
        _wait_healthy(server, port)
        workers = _children(server.pid)
        assert workers, "no worker process"
        head, body = _multipart(png_bytes(images[3]))
        with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
            client.sendall(head + body[: len(body) // 2])  # a request in flight ...
            time.sleep(0.5)
            server.send_signal(signal.SIGTERM)  # ... when the server is told to stop
            time.sleep(1.0)
            client.sendall(body[len(body) // 2 :])
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]  # it was answered, by a live worker
        assert b'"results"' in answer
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    assert server.returncode in (0, -signal.SIGTERM), server.stderr.read()[-2000:] if server.stderr else ""
    assert _gone(workers), f"workers {workers} outlived the server"
    assert "Traceback" not in (server.stderr.read() if server.stderr else "")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_die_with_a_killed_server(index_dir, tmp_path):
    port = _free_port()
    server = _serve(index_dir, port, tmp_path, "inference_workers=2")
    try:
        _wait_healthy(server, port)
        workers = _children(server.pid)
        assert len(workers) >= 2
        server.kill()  # SIGKILL: no handler, no atexit, nothing the server can do
        server.wait(10)
    finally:
        if server.poll() is None:
            server.kill()
    assert _gone(workers), f"workers {workers} outlived a killed server"


def test_a_taken_port_is_one_line_and_exit_2_before_anything_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        start = time.monotonic()
        # an index that does not exist: were it loaded first, that would be the error
        server = _serve(tmp_path / "no-index-here", port, tmp_path)
        _, stderr = server.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert server.returncode == 2, stderr[-2000:]
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}: address already in use" in lines[0]
    assert "Traceback" not in stderr and time.monotonic() - start < 120


def test_bad_limits_are_one_line_and_exit_2(tmp_path):
    server = _serve(tmp_path / "no-index-here", _free_port(), tmp_path, "+limits.max_histroy=5")
    _, stderr = server.communicate(timeout=120)
    assert server.returncode == 2 and "max_histroy" in stderr and "Traceback" not in stderr
    assert np.sum(["fashion-serve:" in line for line in stderr.splitlines()]) == 1
