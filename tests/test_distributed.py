"""`lens index --ray`: a Ray Data pipeline embeds the gallery and the index holds the vectors a
single-process build gives. One local Ray (2 CPUs, bound to 127.0.0.1) serves the whole module."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import REPO, write_gallery
from lens.distributed import RayCluster
from lens.errors import LensError
from lens.gallery import Gallery

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray[data] is not installed (pip install 'lens[scale]')")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray for this module: 2 CPUs, token auth with a throw-away token (nothing written to
    ~/.ray), its session files in a temporary folder; afterwards no process of it may remain."""
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    temp = tempfile.mkdtemp(prefix="lens-ray-")
    ray_cluster = RayCluster(num_cpus=2, temp_dir=temp)
    ray_cluster.start()
    try:
        yield ray_cluster
    finally:
        started = psutil.Process().children(recursive=True)  # GCS, raylet, workers and actors
        ray_cluster.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _, alive = psutil.wait_procs(started, timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
        assert not alive, f"Ray processes left running: {[p.pid for p in alive]}"


def _gallery(folder: Path, count: int = 12) -> Path:
    write_gallery(folder, count)
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def _same_index(one: Gallery, other: Gallery, spec: str) -> None:
    a, b = one.open(spec), other.open(spec)
    assert [item.path for item in a.items] == [item.path for item in b.items]
    assert a.vectors.dtype == b.vectors.dtype
    np.testing.assert_array_equal(np.asarray(a.vectors), np.asarray(b.vectors))
    assert one.manifest(spec)["weights"] == other.manifest(spec)["weights"]


@needs_ray
def test_ray_vectors_equal_the_single_process_ones(cluster, tiny_resnet, tmp_path):
    folder = _gallery(tmp_path / "photos")
    spec = f"hf:{tiny_resnet}"  # float32 cosine vectors (packed hash bits: the next test)
    here = Gallery(folder, tmp_path / "here")
    on_ray = Gallery(folder, tmp_path / "ray")
    told: dict[str, list[tuple[int, int]]] = {"here": [], "ray": []}  # on_progress without a bar (the app's way)
    [want] = here.index([spec], progress=False, on_progress=lambda _, *n: told["here"].append(n))
    [got] = on_ray.index([spec], progress=False, ray=cluster, on_progress=lambda _, *n: told["ray"].append(n))
    assert (got.count, got.embedded, got.reused) == (want.count, want.embedded, want.reused) == (12, 12, 0)
    assert told["ray"][-1] == told["here"][-1] == (13, 13)  # every image counted (the broken one too), not 0
    assert got.skipped == want.skipped and [p for p, _ in got.skipped] == ["broken.jpg"]
    _same_index(here, on_ray, spec)
    # searches find the same images with the same scores
    query = folder / "img000.jpg"
    assert ([(r.path, round(r.score, 6)) for r in on_ray.search(query, spec, k=5)]
            == [(r.path, round(r.score, 6)) for r in here.search(query, spec, k=5)])


@needs_ray
def test_cli_ray_address_embeds_only_new_images(cluster, tmp_path):
    """`lens index --ray ADDRESS` joins a running cluster; a re-index embeds only the new files."""
    import ray

    folder = _gallery(tmp_path / "photos")
    spec = "phash"  # packed uint8 bits
    on_ray = Gallery(folder, tmp_path / "ray")
    on_ray.index([spec], progress=False)  # the first build in this process
    write_gallery(folder, 2, start_seed=100)
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lens", "index", str(folder), "--index-dir", str(tmp_path / "ray"),
                           "--methods", spec, "--quiet", "--ray", address],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "14 images indexed (2 embedded, 12 reused, 1 skipped)" in done.stdout
    here = Gallery(folder, tmp_path / "here")
    here.index([spec], progress=False)
    _same_index(here, Gallery(folder, tmp_path / "ray"), spec)


@needs_ray
def test_local_ray_listens_on_loopback_only(cluster):
    import ray

    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
    listening = {conn.laddr.ip for child in psutil.Process().children(recursive=True)
                 for conn in _connections(child) if conn.status == psutil.CONN_LISTEN}
    assert listening and all(_loopback(ip) for ip in listening), listening


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def _connections(process: psutil.Process) -> list:
    try:
        return process.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_an_actor_with_other_weights_is_refused(tiny_resnet, tiny_resnet_other):
    """A node that loads another model than the driver (another file at the same path) refuses to embed."""
    from lens.distributed import _EmbedActor
    from lens.methods import create_method

    info = create_method(f"hf:{tiny_resnet}").info
    with pytest.raises(LensError, match="other weights"):
        _EmbedActor(f"hf:{tiny_resnet_other}", None, info.weights, info.dim, os.getcwd(), batch_size=8, workers=1)


@needs_ray
def test_methods_that_learn_from_the_gallery_build_here(cluster, photos, tmp_path, caplog):
    on_ray, here = Gallery(photos, tmp_path / "ray"), Gallery(photos, tmp_path / "here")
    [report] = on_ray.index(["sift"], progress=False, ray=cluster)
    assert "sift: learns a vocabulary from the gallery, so it is not embedded on Ray" in caplog.text
    here.index(["sift"], progress=False)
    assert report.count == report.embedded > 0
    _same_index(here, on_ray, "sift")


def test_without_ray_installed_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(LensError, match=r"pip install 'lens\[scale\]'"):
        RayCluster().start()


def test_the_default_install_does_not_import_ray():
    code = ("import sys, lens.cli, lens.gallery, lens.distributed; "
            "lens.cli.build_parser(); print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
