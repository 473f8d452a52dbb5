"""Start and stop a real Milvus standalone server (the PyPI ``milvus`` package's ``milvus-server``).

Used by the Milvus tests (one server per test session) and ``benchmarks/milvus_vs_faiss.py``. The
server is reached at 127.0.0.1 on a free port, every component advertises 127.0.0.1 (``<component>.ip``)
and its etcd listens on loopback only; in Milvus 2.3.5 the components' gRPC ports still bind every
interface (the ``ip`` setting is the advertised address). Its data live in the folder given; :func:`stop` ends it by its process id (and its process group: the
``milvus`` binary runs as a child of the ``milvus-server`` wrapper).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

#: the Milvus components whose advertised address is pinned to the loopback interface
COMPONENTS = ("proxy", "rootCoord", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")


def executable() -> str | None:
    """The ``milvus-server`` command of this environment, or None when the ``milvus`` package is absent."""
    beside = Path(sys.executable).with_name("milvus-server")
    return str(beside) if beside.exists() else shutil.which("milvus-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(data_dir: Path, port: int | None = None, timeout: float = 240.0) -> tuple[subprocess.Popen, str]:
    """Start ``milvus-server --data DATA_DIR`` on 127.0.0.1:``port`` (a free one by default) and wait
    until it answers; returns the process and its URI. Raises RuntimeError (after stopping it) when it
    does not start within ``timeout`` seconds; its log is ``DATA_DIR/server.log``."""
    command = executable()
    if command is None:
        raise RuntimeError("milvus-server is not installed (pip install milvus)")
    port = port or free_port()
    _wait_bindable(port, timeout)  # milvus-server moves to another port if this one is still held
    data_dir.mkdir(parents=True, exist_ok=True)
    pinned = [arg for name in COMPONENTS for arg in ("--extra-config", f"{name}.ip=127.0.0.1")]
    log = open(data_dir / "server.log", "ab")
    process = subprocess.Popen([command, "--data", str(data_dir), "--proxy-port", str(port), *pinned],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    log.close()
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while not _answers(uri):
            if process.poll() is not None:
                raise RuntimeError(f"milvus-server exited with {process.returncode}; see {data_dir / 'server.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"milvus-server did not answer on {uri} within {timeout:g} s")
            time.sleep(1.0)
    except BaseException:
        stop(process)
        raise
    return process, uri


def _wait_bindable(port: int, timeout: float) -> None:
    """Wait until ``port`` can be bound as milvus-server checks it (no SO_REUSEADDR): after a stop,
    connections the server closed first hold it in TIME_WAIT for up to a minute."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} is still in use after {timeout:g} s") from None
        time.sleep(1.0)


def _answers(uri: str) -> bool:
    """True once the server's proxy accepts a client and reports its version."""
    host, port = uri.rsplit("/", 1)[-1].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            pass
    except OSError:
        return False
    from pymilvus import MilvusClient

    try:
        client = MilvusClient(uri, timeout=5)
        client.list_collections()
        client.close()
        return True
    except Exception:
        return False


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop the server by its process id: SIGINT (the wrapper stops the ``milvus`` child), then
    SIGKILL to its whole process group if it has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the milvus child too, if it outlived its wrapper
    except (ProcessLookupError, PermissionError):
        pass
    process.wait(timeout=timeout)
