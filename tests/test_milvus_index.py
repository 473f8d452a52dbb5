"""The Milvus index backend: Milvus Lite (embedded) in every run, and a real Milvus standalone server.

The server (the PyPI ``milvus`` package's ``milvus-server``) is started once per test session on
127.0.0.1 with a temporary data folder (``milvus_server`` fixture) and stopped by its process id
at the end, also when a test fails. Tests skip with the reason when pymilvus, milvus-lite or the
server package is absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_gallery
from near_duplicates import VARIANTS, photo, write_photos
from PIL import Image

from lens import Gallery
from lens.errors import IndexMismatchError, LensError
from lens.index import create_index
from lens.index.milvus_index import collection_name, parse_spec
from lens.methods import register_method
from lens.service import LensService
from lens.types import BaseMethod, MethodInfo, l2_normalise

METHOD = "test-milvus-colours"


class Colours(BaseMethod):
    """A tiny float method: the 8 x 8 thumbnail's colours (192-d), enough to tell photos apart."""

    info = MethodInfo(name=METHOD, metric="cosine", dim=192, model="colours", weights="v1")

    def prepare(self, image):
        return np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32).reshape(-1) - 128.0

    def embed_prepared(self, items: Sequence[np.ndarray]) -> np.ndarray:
        return l2_normalise(np.stack(items))


register_method(METHOD)(lambda spec, model=None, **options: Colours())


def _needs_lite() -> None:
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'lens[scale]')")
    pytest.importorskip("milvus_lite", reason="milvus-lite cannot be installed on this platform")


class Server:
    """The session's Milvus server: its URI, and a restart that keeps its data folder."""

    def __init__(self, data_dir: Path):
        import milvus_server

        self._module, self.data_dir = milvus_server, data_dir
        self.process, self.uri = milvus_server.start(data_dir)

    def stop(self) -> None:
        from lens.index.milvus_index import close_clients

        close_clients()  # clients hang up first: the server's port is not left in TIME_WAIT
        if self.process is not None:
            self._module.stop(self.process)
            self.process = None

    def restart(self) -> None:
        self.stop()
        port = int(self.uri.rsplit(":", 1)[1])
        self.process, self.uri = self._module.start(self.data_dir, port=port)


@pytest.fixture(scope="session")
def milvus(tmp_path_factory) -> Iterator[Server]:
    """A Milvus standalone server on 127.0.0.1 (started once per session, stopped by its PID)."""
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'lens[scale]')")
    import milvus_server

    if milvus_server.executable() is None:
        pytest.skip("the milvus server package is not installed (pip install milvus==2.3.5)")
    server = Server(tmp_path_factory.mktemp("milvus-server"))
    try:
        yield server
    finally:
        server.stop()


# -- the spec, names and errors (no Milvus needed) -------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ("milvus:./lens.db", ("./lens.db", "HNSW", {})),
    ("milvus:http://127.0.0.1:19530", ("http://127.0.0.1:19530", "HNSW", {})),
    ("milvus:http://127.0.0.1:19530:HNSW:M=32,ef=64", ("http://127.0.0.1:19530", "HNSW", {"M": "32", "ef": "64"})),
    ("milvus:/data/x.db:IVF_FLAT:nlist=1024,nprobe=16", ("/data/x.db", "IVF_FLAT", {"nlist": "1024", "nprobe": "16"})),
    ("milvus:https://db.example:443:FLAT", ("https://db.example:443", "FLAT", {})),
])
def test_spec_keeps_the_uri_whole_and_reads_index_type_and_options(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec, metric, message", [
    ("milvus", "cosine", "needs a URI"),
    ("milvus:http://h:19530:HNSW:M=32,wrong=1", "cosine", "option 'wrong' does not apply to Milvus HNSW"),
    ("milvus:http://h:19530:IVF_FLAT:ef=3", "cosine", "option 'ef' does not apply"),
    ("milvus:http://h:19530:HNSW:M", "cosine", "should look like key=value"),
    ("milvus:http://h:19530:HNSW:M=many", "cosine", "must be a number"),
    ("milvus:http://h:19530:HNSW:consistency=always", "cosine", "consistency 'Always'"),
    ("milvus:./lens.db", "hamming", "float vectors"),
])
def test_bad_specs_get_clear_messages(spec, metric, message):
    with pytest.raises(LensError, match=re.escape(message)):
        create_index(spec, 8, metric)


def test_collection_names_follow_milvus_rules_and_differ_per_gallery_and_method():
    names = {collection_name(gallery, method) for gallery in ("/a/my photos-2024", "/b/my photos-2024")
             for method in ("hf-org--model.v2", "resnet50")}
    assert len(names) == 4
    for name in names:
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name), name
    assert collection_name("/a/" + "x" * 400, "m" * 300).__len__() == 255


def test_an_unreachable_server_is_a_clear_error_naming_it():
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'lens[scale]')")
    import milvus_server

    uri = f"http://127.0.0.1:{milvus_server.free_port()}"  # nothing listens there
    index = create_index(f"milvus:{uri}:HNSW:timeout=3", 8, "cosine")
    with pytest.raises(LensError, match=re.escape(f"cannot connect to the Milvus server '{uri}' within 3 s")):
        index.sync(["a.jpg"], np.ones((1, 8), np.float32), {"a.jpg"}, gallery="/g", method="m", facts={})


def test_the_default_path_does_not_import_pymilvus():
    code = ("import sys, lens.gallery, lens.index; lens.index.list_backends(); "
            "print('pymilvus' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


# -- through a gallery, on Milvus Lite and on the server -------------------------------------------
def _backend(request, tmp_path: Path) -> str:
    if request.param == "lite":
        _needs_lite()
        return f"milvus:{tmp_path / 'lens.db'}"
    server = request.getfixturevalue("milvus")
    return f"milvus:{server.uri}:HNSW:M=16,ef=32,consistency=Strong"  # no settling: each search waits instead


@pytest.fixture(params=["lite", "server"])
def milvus_spec(request, tmp_path) -> str:
    return _backend(request, tmp_path)


def _rows(spec: str, gallery: Gallery) -> list[str]:
    """The image ids the collection holds (read with pymilvus, not through lens)."""
    from pymilvus import MilvusClient

    stored = gallery.open(METHOD)
    where = json.loads((stored.folder / "milvus.json").read_text())
    client = MilvusClient(where["uri"])
    client.load_collection(where["collection"])
    rows = client.query(where["collection"], filter="", output_fields=["path"], limit=1000,
                        consistency_level="Strong")
    return sorted(row["path"] for row in rows)


def test_build_search_and_incremental_upsert_and_delete(tmp_path, milvus_spec):
    photos = tmp_path / "photos"
    write_photos(photos)
    gallery = Gallery(photos, tmp_path / "idx")
    [report] = gallery.index([METHOD], index_spec=milvus_spec, progress=False)
    assert report.embedded == report.count == len(list(photos.iterdir()))
    exact = Gallery(photos, tmp_path / "flat")
    exact.index([METHOD], index_spec="faiss:Flat", progress=False)

    query = VARIANTS["jpeg"](photo("astronaut"))
    found = Gallery(photos, tmp_path / "idx").search(query, METHOD, k=4)
    reference = exact.search(query, METHOD, k=4)
    assert [(r.path, r.kind, r.match) for r in found] == [(r.path, r.kind, r.match) for r in reference]
    assert [r.score for r in found] == pytest.approx([r.score for r in reference], abs=1e-4)
    assert _rows(milvus_spec, gallery) == sorted(p.name for p in photos.iterdir())

    # re-index after one photo is removed, one replaced and one added: only those two are embedded
    (photos / "coffee.png").unlink()
    VARIANTS["jpeg"](photo("rocket")).save(photos / "moon.png")
    shutil.copy(photos / "astronaut.png", photos / "astronaut-copy.png")
    [report] = gallery.index([METHOD], progress=False)  # the spec of the last build is kept
    assert (report.embedded, report.reused) == (2, report.count - 2)
    assert gallery.manifest(METHOD)["index"].startswith("milvus:")
    assert _rows(milvus_spec, gallery) == sorted(p.name for p in photos.iterdir())
    again = gallery.search(query, METHOD, k=3)
    assert {r.path for r in again[:2]} == {"astronaut.png", "astronaut-copy.png"}
    assert "coffee.png" not in {r.path for r in gallery.search(photo("coffee"), METHOD, k=20)}


def test_a_collection_rewritten_by_another_model_is_refused(tmp_path):
    _needs_lite()
    photos = tmp_path / "photos"
    write_gallery(photos, 4)
    spec = f"milvus:{tmp_path / 'lens.db'}"
    gallery = Gallery(photos, tmp_path / "idx")
    gallery.index([METHOD], index_spec=spec, progress=False)
    index = gallery.open(METHOD).index
    facts = {"model": "other", "weights": "v2", "dim": 192, "metric": "cosine"}
    index.client.alter_collection_properties(index.collection, properties={"lens.facts": json.dumps(facts)})
    with pytest.raises(IndexMismatchError, match="rewritten with model 'other' \\(weights v2"):
        Gallery(photos, tmp_path / "idx").open(METHOD)


def test_a_lite_file_in_use_by_another_process_is_a_clear_error(tmp_path):
    _needs_lite()
    photos = tmp_path / "photos"
    write_gallery(photos, 2)
    Gallery(photos, tmp_path / "idx").index([METHOD], index_spec=f"milvus:{tmp_path / 'lens.db'}", progress=False)
    code = ("import sys; from lens.index import create_index; from lens.errors import LensError\n"
            "try: create_index('milvus:' + sys.argv[1], 8, 'cosine').client\n"
            "except LensError as exc: print(exc)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "lens.db")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert "Milvus Lite admits one process at a time" in done.stdout, done.stderr


# -- the real server only ----------------------------------------------------------------------------
READER = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import test_milvus_index  # registers the test method
from PIL import Image
from lens import Gallery
found = Gallery(sys.argv[3], sys.argv[4]).search(Image.open(sys.argv[5]), test_milvus_index.METHOD, k=2)
print(json.dumps([result.path for result in found]))
"""


def test_server_two_processes_restart_and_an_app_that_keeps_serving(tmp_path, milvus):
    photos = tmp_path / "photos"
    write_gallery(photos, 6)
    gallery = Gallery(photos, tmp_path / "idx")
    gallery.index([METHOD], index_spec=f"milvus:{milvus.uri}", progress=False)  # Bounded; settles 5 s
    gallery.index(["phash"], progress=False)

    # two processes read the same collection at once
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(REPO / "tests"), str(REPO), str(photos),
                                 str(tmp_path / "idx"), str(photos / name)], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in ("img000.jpg", "nested/img002.jpg")]
    outputs = [reader.communicate(timeout=300) for reader in readers]
    assert [reader.returncode for reader in readers] == [0, 0], [err for _, err in outputs]
    assert [json.loads(out)[0] for out, _ in outputs] == ["img000.jpg", "nested/img002.jpg"]

    # the server is down: the app marks the Milvus method failed, naming the server, and serves the other
    milvus.stop()
    try:
        service = LensService(Gallery(photos, tmp_path / "idx"), [METHOD, "phash"])
        service.start(background=False, build_missing=False)
        states = {state.name: state for state in service.states()}
        assert states["phash"].status == "ready"
        assert states[METHOD].status == "failed" and milvus.uri in states[METHOD].detail, states[METHOD]
        assert service.search(Image.open(photos / "img001.png"), "phash", k=1).results[0].path == "img001.png"
    finally:
        milvus.restart()  # same data folder and port: the collection is still there

    # a restarted server loads its collections again before it answers searches (a timeout until then)
    deadline = time.monotonic() + 180
    while True:
        try:
            found = Gallery(photos, tmp_path / "idx").search(photos / "img003.png", METHOD, k=1)
            break
        except LensError as exc:
            assert milvus.uri in str(exc)
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    assert found[0].path == "img003.png"
