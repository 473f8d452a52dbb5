"""Load test: the app on localhost driven by concurrent gradio_client clients.

Each client loops for the duration: upload a photo and detect (/detect), pick a box by coordinates
(/pick), search it with a random served method (/search; i.e. method switches), now and then compare
every method (/compare). Reports requests served, errors, latency p50/p95 per endpoint and the server's
peak resident memory (the app process and its children).

    python benchmarks/load_test.py --clients 16 --seconds 120 \
        --methods hf:../shared/weights/efficientnet_lite0.in1k,phash,sift \
        --detector-weights ../shared/weights/yolov8n_int8.tflite

Only localhost is contacted; the loops stop by themselves after --seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "app.py"), "--host", "127.0.0.1", "--port", str(port),
               "--methods", args.methods]
    if args.gallery:
        command += ["--gallery", args.gallery]
    if args.detector_weights:
        command += ["--detector-weights", args.detector_weights]
    for model in args.model:
        command += ["--model", model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> list[str]:
    from gradio_client import Client

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("the app did not start")
            time.sleep(0.5)
    client = Client(url, verbose=False)
    while True:
        states = client.predict(api_name="/methods")
        if all(s["status"] in ("ready", "failed") for s in states):
            return [s["name"] for s in states if s["status"] == "ready"]
        if time.time() > deadline:
            raise SystemExit(f"indexes not ready: {states}")
        time.sleep(1)


def client_loop(url: str, photos: list[Path], methods: list[str], until: float, seed: int,
                latencies: dict[str, list[float]], errors: list[str], lock: threading.Lock) -> None:
    from gradio_client import Client, handle_file

    rng = random.Random(seed)
    client = Client(url, verbose=False)

    def call(endpoint: str, *args):
        started = time.perf_counter()
        try:
            result = client.predict(*args, api_name=endpoint)
        except Exception as exc:  # every failure is counted and reported
            with lock:
                errors.append(f"{endpoint}: {type(exc).__name__}: {exc}"[:300])
            return None
        with lock:
            latencies[endpoint].append(time.perf_counter() - started)
        return result

    while time.time() < until:
        photo = handle_file(str(rng.choice(photos)))
        detected = call("/detect", photo, "", 0.25)
        box = None
        if detected and detected["boxes"]:
            w, h = detected["size"]
            picked = call("/pick", detected["boxes"], rng.uniform(0, w), rng.uniform(0, h))
            box = detected["boxes"][picked]["box"] if picked is not None else None
        for method in rng.sample(methods, k=min(2, len(methods))):  # a method switch
            if time.time() >= until:
                break
            call("/search", photo, method, 8, box)
        if rng.random() < 0.1 and time.time() < until:
            call("/compare", photo, 5, box)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--methods", default="hf:../shared/weights/efficientnet_lite0.in1k,phash,sift")
    parser.add_argument("--gallery", help="gallery folder (default: the app's sample gallery)")
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--detector-weights")
    parser.add_argument("--startup-timeout", type=float, default=600)
    args = parser.parse_args()
    args.methods = ",".join(m.replace("hf:../", f"hf:{REPO.parent}/") for m in args.methods.split(","))

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = Path(tempfile.mkdtemp()) / "app.log"
    server = start_app(args, port, log)
    try:
        methods = wait_ready(url, server, args.startup_timeout)
        print(f"app ready on {url} with methods {methods} (log: {log})")
        photos = sorted((REPO / "examples").glob("*.jpg"))
        process = psutil.Process(server.pid)
        peak = [0]
        latencies: dict[str, list[float]] = defaultdict(list)
        errors: list[str] = []
        lock = threading.Lock()
        until = time.time() + args.seconds
        threads = [threading.Thread(target=client_loop, args=(url, photos, methods, until, i, latencies, errors, lock))
                   for i in range(args.clients)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            rss = process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
            peak[0] = max(peak[0], rss)
            time.sleep(0.5)
        served = sum(len(v) for v in latencies.values())
        print(f"\n{args.clients} clients for {args.seconds:.0f} s: {served} requests served, {len(errors)} errors, "
              f"{served / args.seconds:.1f} requests/s; peak server memory {peak[0] / 2**20:.0f} MiB")
        print(f"{'endpoint':<10} {'count':>6} {'p50 ms':>8} {'p95 ms':>8}")
        for endpoint, values in sorted(latencies.items()):
            ms = np.array(values) * 1000
            print(f"{endpoint:<10} {len(ms):>6} {np.percentile(ms, 50):>8.0f} {np.percentile(ms, 95):>8.0f}")
        for error in errors[:10]:
            print("error:", error)
        if errors:
            raise SystemExit(1)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
