"""App start-up time and memory with every method loaded, and index bytes per image per method.

Launches ``python app.py`` on a real gallery whose indexes exist (``--no-build``), with all seven
methods and the YOLO detector, and measures:

- seconds until the page answers (HTTP 200), and until every method is ``ready`` (model loaded, index
  opened and its checksums verified);
- resident memory of the app process once every method and the detector have served a request;
- bytes per indexed image of each method's build (vectors, index, per-image data, from its manifest).

It starts the app twice: first with an empty ONNX cache (the backbones are exported on the way), then
again (the exports are reused, as on every later start).

    python -m benchmarks.app_startup                     # about 5 minutes on 2 cores (gallery reused)
    python -m benchmarks.app_startup --methods effnet,resnet50,vit,siamese,autoencoder,phash --pad 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from benchmarks.serving_gallery import METHOD_ORDER, SHARED_TEST, environment, prepare

REPO = Path(__file__).resolve().parents[1]
YOLO = REPO.parent / "shared" / "weights" / "yolov8n_int8.tflite"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resident(process: psutil.Process) -> int:
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


def start_app(gallery: Path, indexes: Path, specs: dict[str, str], models: dict[str, str], cache: Path,
              photo: Path) -> dict[str, float]:
    from gradio_client import Client, handle_file

    port = free_port()
    command = [sys.executable, str(REPO / "app.py"), "--gallery", str(gallery), "--index-dir", str(indexes),
               "--methods", ",".join(specs.values()), "--no-build", "--detector-weights", str(YOLO),
               "--host", "127.0.0.1", "--port", str(port)]
    for spec, folder in models.items():
        command += ["--model", f"{spec}={folder}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LENS_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    log = open(cache.parent / "app.log", "a")
    started = time.perf_counter()
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    process = psutil.Process(server.pid)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"the app exited; see {cache.parent / 'app.log'}") from None
                time.sleep(0.1)
        http = time.perf_counter() - started
        client = Client(url, verbose=False)
        while True:
            states = client.predict(api_name="/methods")
            if all(s["status"] in ("ready", "failed", "missing") for s in states):  # none queued or building
                break
            time.sleep(0.1)
        ready = time.perf_counter() - started
        failed = [s for s in states if s["status"] != "ready"]
        if failed:
            raise RuntimeError(f"methods not ready: {failed}")
        memory_ready = resident(process)
        client.predict(handle_file(str(photo)), "", 0.25, api_name="/detect")
        for spec in specs.values():
            client.predict(handle_file(str(photo)), spec, 10, None, api_name="/search")
        return {"http": http, "ready": ready, "rss_ready": memory_ready, "rss_served": resident(process)}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lens-serving-bench")
    parser.add_argument("--methods", help="comma-separated subset of " + ",".join(METHOD_ORDER))
    parser.add_argument("--pad", type=int, help="pad every index to this many images with synthetic rows "
                                                "(as benchmarks/query_latency.py does; not sift)")
    args = parser.parse_args()
    from lens import Gallery
    from lens.store import read_manifest

    print(environment())
    gallery, indexes, specs, models = prepare(args.work, args.images,
                                              args.methods.split(",") if args.methods else None)
    if args.pad:
        import numpy as np

        from benchmarks.query_latency import pad_build

        real, padded = Gallery(gallery, indexes, models=models), args.work / f"startup-padded-{args.pad}"
        for spec in specs.values():
            if not (padded / real.method_dir(spec).name / "CURRENT").is_file():  # made once, then reused
                pad_build(real, spec, args.pad, padded, np.random.default_rng(0))
        indexes = padded
        print(f"indexes padded to {args.pad:,} images in {padded}")
    photo = next(iter(sorted(SHARED_TEST.rglob("*.jpg"))))
    cache = args.work / "onnx-cache"
    shutil.rmtree(cache, ignore_errors=True)
    for label in ("first start (ONNX exports made)", "next start (exports reused)"):
        figures = start_app(gallery, indexes, specs, models, cache, photo)
        print(f"{label}: page answers after {figures['http']:.1f} s, all {len(specs)} methods ready after "
              f"{figures['ready']:.1f} s; resident memory {figures['rss_ready'] / 2**20:,.0f} MiB when ready, "
              f"{figures['rss_served'] / 2**20:,.0f} MiB after every method and the detector served a request",
              flush=True)
    print("\n| method | images | index spec | bytes per image | of which vectors.npy |")
    print("|---|---:|---|---:|---:|")
    layout = Gallery(gallery, indexes, models=models)
    for name, spec in specs.items():
        manifest = read_manifest(layout.method_dir(spec))
        total = sum(f["bytes"] for f in manifest["files"].values())
        vectors = manifest["files"]["vectors.npy"]["bytes"]
        count = manifest["count"]
        print(f"| {name} | {count:,} | `{manifest['index']}` | {total / count:,.0f} | {vectors / count:,.0f} |")


if __name__ == "__main__":
    main()
