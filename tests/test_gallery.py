"""Indexing a folder and searching it through the public Gallery API, with real Annoy files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import make_picture, write_gallery
from PIL import Image

from lens import Box, Gallery, LensError
from lens.errors import IndexMismatchError, IndexNotFoundError
from lens.images import crop
from lens.index.annoy_index import AnnoyIndex


@pytest.fixture()
def gallery(gallery_dir, tmp_path, tiny_resnet) -> Gallery:
    return Gallery(gallery_dir, tmp_path / "indexes", models={"resnet50": str(tiny_resnet)})


def _paths(results) -> list[str]:
    return [r.path for r in results]


def test_query_with_a_gallery_image_finds_it_first(gallery, gallery_dir):
    [report] = gallery.index(["resnet50"], progress=False)
    assert report.count == 12 and report.embedded == 12 and report.reused == 0
    files = sorted(p.relative_to(gallery_dir).as_posix() for p in gallery_dir.rglob("img*"))
    assert sorted(item.path for item in gallery.open("resnet50").items) == files
    for relpath in files[:4]:
        results = gallery.search(gallery_dir / relpath, "resnet50", k=5)
        assert results[0].path == relpath
        assert results[0].score == pytest.approx(1.0, abs=1e-4)
        assert [r.rank for r in results] == [1, 2, 3, 4, 5]
        assert all(0.0 <= r.score <= 1.0 for r in results)
        assert all(a.score >= b.score for a, b in zip(results, results[1:]))


def test_index_is_written_under_the_method_folder_with_a_manifest(gallery, tiny_resnet):
    gallery.index(["resnet50"], progress=False)
    method_dir = gallery.index_dir / "resnet50"
    build = method_dir / (method_dir / "CURRENT").read_text().strip()
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["method"] == "resnet50"
    assert manifest["model"] == str(tiny_resnet)
    assert manifest["dim"] == 16 and manifest["metric"] == "cosine" and manifest["count"] == 12
    assert manifest["index"] == "annoy" and manifest["weights"].startswith("sha256:")
    assert {"index.ann", "items.json", "vectors.npy"} <= set(manifest["files"])
    assert gallery.indexed_methods() == ["resnet50"]
    on_gpu = gallery.method("resnet50").device.type == "cuda"
    assert manifest["build"]["batch_size"] == (32 if on_gpu else 8)  # the default where the model runs


def test_box_searches_only_that_region(gallery, gallery_dir, tmp_path):
    gallery.index(["resnet50"], progress=False)
    target = Image.open(gallery_dir / "img000.jpg").convert("RGB")
    canvas = Image.new("RGB", (400, 300), (255, 255, 255))
    canvas.paste(make_picture(99, size=(200, 300)), (200, 0))
    canvas.paste(target, (30, 40))
    box = (30, 40, 30 + target.width, 40 + target.height)
    assert gallery.search(canvas, "resnet50", k=1, box=box)[0].path == "img000.jpg"
    assert gallery.search(canvas, "resnet50", k=1, box=box)[0].score > 0.99
    # a detector's Box works as well as 4 numbers; with a margin the crop takes in some context
    detected = Box(*box, label="picture", score=0.7)
    assert gallery.search(canvas, "resnet50", k=3, box=detected) == gallery.search(canvas, "resnet50", k=3, box=box)
    widened = gallery.search(canvas, "resnet50", k=3, box=detected, margin=0.3)
    assert widened == gallery.search(crop(canvas, box, 0.3), "resnet50", k=3)
    assert widened != gallery.search(canvas, "resnet50", k=3, box=box)


def test_index_built_by_another_model_is_refused_naming_both(gallery, gallery_dir, tiny_resnet,
                                                            tiny_resnet_other):
    gallery.index(["resnet50"], progress=False)
    other = Gallery(gallery_dir, gallery.index_dir, models={"resnet50": str(tiny_resnet_other)})
    with pytest.raises(IndexMismatchError) as caught:
        other.search(gallery_dir / "img000.jpg", "resnet50")
    message = str(caught.value)
    assert str(tiny_resnet) in message and str(tiny_resnet_other) in message
    assert "dim 16" in message and "dim 24" in message


def test_searching_a_method_without_index_says_how_to_build_it(gallery, gallery_dir):
    with pytest.raises(IndexNotFoundError, match="no index for method 'resnet50'"):
        gallery.search(gallery_dir / "img000.jpg", "resnet50")


def test_interrupted_embedding_leaves_the_previous_index_loadable(gallery, gallery_dir, monkeypatch):
    gallery.index(["resnet50"], progress=False)
    before = gallery.search(gallery_dir / "img001.png", "resnet50", k=3)
    write_gallery(gallery_dir / "more", 40, start_seed=100)
    method = gallery.method("resnet50")
    calls = {"n": 0}

    def failing_after_one_batch(original):
        def failing(items):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("power cut")
            return original(items)
        return failing

    # bulk embedding calls one or the other (embed_stream when the method runs in streams)
    for name in ("embed_prepared", "embed_stream"):
        monkeypatch.setattr(method, name, failing_after_one_batch(getattr(method, name)))
    with pytest.raises(RuntimeError, match="power cut"):
        gallery.index(["resnet50"], batch_size=8, progress=False)
    monkeypatch.undo()
    fresh = Gallery(gallery.root, gallery.index_dir, models=gallery.models)
    assert fresh.open("resnet50").manifest["count"] == 12
    assert _paths(fresh.search(gallery_dir / "img001.png", "resnet50", k=3)) == _paths(before)
    assert not [p for p in (gallery.index_dir / "resnet50").iterdir() if p.name.startswith(".staging")]


def test_interrupted_index_write_leaves_the_previous_index_loadable(gallery, gallery_dir, monkeypatch):
    gallery.index(["resnet50"], progress=False)
    write_gallery(gallery_dir / "more", 3, start_seed=200)

    def half_written(self, folder: Path):
        (Path(folder) / "index.ann").write_bytes(b"\0" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(AnnoyIndex, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        gallery.index(["resnet50"], progress=False)
    monkeypatch.undo()
    fresh = Gallery(gallery.root, gallery.index_dir, models=gallery.models)
    assert len(fresh.open("resnet50").index) == 12
    assert fresh.search(gallery_dir / "img000.jpg", "resnet50", k=1)[0].path == "img000.jpg"


def test_reindex_embeds_only_new_and_changed_files(gallery, gallery_dir):
    gallery.index(["resnet50"], progress=False)
    added = write_gallery(gallery_dir / "new", 3, start_seed=300)
    changed = gallery_dir / "img004.jpg"
    make_picture(999).save(changed, quality=95)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    (gallery_dir / "img003.png").unlink()

    [report] = gallery.index(["resnet50"], progress=False)
    assert (report.embedded, report.reused, report.count) == (4, 10, 14)
    assert gallery.search(added[0], "resnet50", k=1)[0].path == added[0].relative_to(gallery_dir).as_posix()
    assert gallery.search(make_picture(999), "resnet50", k=1)[0].path == "img004.jpg"
    assert "img003.png" not in {item.path for item in gallery.open("resnet50").items}

    [again] = gallery.index(["resnet50"], progress=False)
    assert (again.embedded, again.reused) == (0, 14)


def test_unreadable_files_are_skipped_and_reported(gallery, gallery_dir):
    (gallery_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (gallery_dir / "notes.png").write_text("hello")
    (gallery_dir / "readme.txt").write_text("not an image extension: ignored")
    [report] = gallery.index(["resnet50"], progress=False)
    assert report.count == 12
    assert sorted(path for path, _ in report.skipped) == ["broken.jpg", "notes.png"]


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LensError, match="no images found"):
        Gallery(tmp_path / "empty", tmp_path / "idx").index(["resnet50"], progress=False)
    with pytest.raises(LensError, match="does not exist"):
        Gallery(tmp_path / "missing")


def test_new_build_is_picked_up_by_an_open_gallery(gallery, gallery_dir):
    gallery.index(["resnet50"], progress=False)
    assert len(gallery.open("resnet50").items) == 12
    time.sleep(0.01)
    other = Gallery(gallery.root, gallery.index_dir, models=gallery.models)
    write_gallery(gallery_dir / "late", 2, start_seed=400)
    other.index(["resnet50"], progress=False)
    assert len(gallery.open("resnet50").items) == 14


def test_several_methods_index_side_by_side(gallery_dir, tmp_path, tiny_resnet, tiny_dinov2):
    gallery = Gallery(gallery_dir, tmp_path / "idx",
                      models={"resnet50": str(tiny_resnet), "vit": str(tiny_dinov2)})
    reports = gallery.index(["resnet50", "vit"], progress=False)
    assert [r.method for r in reports] == ["resnet50", "vit"]
    assert sorted(gallery.indexed_methods()) == ["resnet50", "vit"]
    for method in ("resnet50", "vit"):
        assert gallery.search(gallery_dir / "img003.png", method, k=1)[0].path == "img003.png"


def test_large_galleries_get_hnsw_unless_an_index_was_asked_for(gallery, gallery_dir, monkeypatch):
    import lens.index

    monkeypatch.setattr(lens.index, "LARGE_GALLERY", 8)  # 12 images count as "large"
    reports = gallery.index(["resnet50", "phash"], progress=False)
    specs = {r.method: json.loads((r.folder / "manifest.json").read_text())["index"] for r in reports}
    assert specs == {"resnet50": "faiss:HNSW32:efSearch=64", "phash": "annoy"}  # bit codes stay in Annoy
    assert gallery.search(gallery_dir / "img000.jpg", "resnet50", k=1)[0].path == "img000.jpg"
    monkeypatch.setattr(lens.index, "LARGE_GALLERY", 10_000)  # small again: the default follows the size
    [report] = gallery.index(["resnet50"], progress=False)
    assert json.loads((report.folder / "manifest.json").read_text())["index"] == "annoy"
    # an index asked for is kept by later builds, whatever the size
    gallery.index(["resnet50"], index_spec="faiss:Flat", progress=False)
    monkeypatch.setattr(lens.index, "LARGE_GALLERY", 8)
    [report] = gallery.index(["resnet50"], progress=False)
    assert json.loads((report.folder / "manifest.json").read_text())["index"] == "faiss:Flat"


def test_camera_sized_jpegs_are_indexed_from_a_scaled_decode_and_still_match(gallery, gallery_dir):
    big = make_picture(42, size=(2400, 1800))
    big.save(gallery_dir / "camera.jpg", quality=90)
    method = gallery.method("resnet50")
    assert method.decode_size is not None and 1800 >= 2 * method.decode_size  # the gallery file is scaled
    gallery.index(["resnet50"], progress=False)
    [best, *_] = gallery.search(gallery_dir / "camera.jpg", "resnet50", k=3)  # the query: a full decode
    assert best.path == "camera.jpg" and best.score > 0.99
