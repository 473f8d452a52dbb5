"""Faults found by replaying public bug reports of image-search tools (issue #17), each kept as a test.

Every input here is small and generated: two galleries with one folder name, a writer re-indexing
under readers, a picture rewritten with its size and mtime kept, symlinks (dangling, looping, to a
folder), a Latin-1 file name, 16000x1 and 6000x2 strips, AVIF/HEIC files, degenerate boxes, and a
gallery file deleted after indexing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, index_dir_seen_from, make_picture, write_gallery
from PIL import Image

from benchmarks.reindex_stress import run_threads
from lens import Gallery
from lens.errors import IndexMismatchError, LensError, ModelLoadError
from lens.images import MAX_ASPECT, MAX_STRIP_SIDE, ImageError, check_box, iter_image_files, load_image
from lens.store import ITEMS, live_build, reading


def lens(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "lens", *args], cwd=cwd, env=environment,
                          capture_output=True, timeout=300)


# -- 1. two galleries with the same folder name --------------------------------------------------------
def test_galleries_with_the_same_folder_name_never_share_an_index(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_gallery(tmp_path / "2023" / "photos", 4, start_seed=0)
    write_gallery(tmp_path / "2024" / "photos", 4, start_seed=100)
    old, new = Gallery("2023/photos"), Gallery("2024/photos")
    assert old.index_dir != new.index_dir and old.index_dir.name.startswith("photos-")
    old.index(["phash"], progress=False)
    new.index(["phash"], progress=False)
    for gallery, seed in ((old, 0), (new, 100)):
        [hit] = gallery.search(make_picture(seed), "phash", k=1)
        assert hit.path == f"img{seed:03d}.jpg" and hit.file.is_file() and hit.score == 1.0
        assert gallery.manifest("phash")["gallery"] == os.fspath((tmp_path / gallery.root).resolve())

    # an index folder shared on purpose (--index-dir) is refused for the other root, naming both...
    shared = Gallery("2024/photos", old.index_dir)
    with pytest.raises(IndexMismatchError) as caught:
        shared.search(make_picture(100), "phash", k=1)
    assert str((tmp_path / "2023/photos").resolve()) in str(caught.value)
    assert str((tmp_path / "2024/photos").resolve()) in str(caught.value)
    # ... and rebuilt for the new root by `index`, after which it serves that root only
    [report] = shared.index(["phash"], progress=False)
    assert report.count == 4 and report.embedded == 4
    assert shared.search(make_picture(100), "phash", k=1)[0].path == "img100.jpg"
    with pytest.raises(IndexMismatchError):
        Gallery("2023/photos", old.index_dir).search(make_picture(0), "phash", k=1)


def test_galleries_with_the_same_folder_name_never_share_a_trained_model(tmp_path, monkeypatch):
    """Trained models are keyed like index folders (models/<name>-<hash of the path>/), not by the folder
    name: 2024/photos never loads the autoencoder `lens train` wrote for 2023/photos."""
    from lens.training import TrainSettings
    from lens.training.autoencoder import train

    monkeypatch.chdir(tmp_path)
    write_gallery(tmp_path / "2023" / "photos", 8, start_seed=0)
    write_gallery(tmp_path / "2024" / "photos", 8, start_seed=100)
    old, new = Gallery("2023/photos"), Gallery("2024/photos")
    assert old.models_dir != new.models_dir
    assert old.models_dir == Path("models") / old.index_dir.name and old.models_dir.name.startswith("photos-")
    train("2023/photos", old.models_dir / "autoencoder", TrainSettings(epochs=1, batch_size=4, val_split=0.25),
          image_size=32, latent_dim=16, progress=False)
    old.index(["autoencoder"], progress=False)
    assert old.search("2023/photos/img000.jpg", "autoencoder", k=1)[0].path == "img000.jpg"
    with pytest.raises(ModelLoadError, match="lens train autoencoder") as caught:
        new.index(["autoencoder"], progress=False)
    assert "older lens" not in str(caught.value)
    # a model an older lens wrote to models/photos/ is named in the error, never used silently
    shutil.copytree(old.models_dir / "autoencoder", tmp_path / "models" / "photos" / "autoencoder")
    with pytest.raises(ModelLoadError, match=r"models/photos/autoencoder holds a model trained by an older lens"):
        Gallery("2024/photos").index(["autoencoder"], progress=False)


# -- 2. searching while the same gallery is re-indexed --------------------------------------------------
def test_searches_during_reindexing_get_a_complete_build_and_never_fail(tmp_path):
    folder = tmp_path / "photos"
    write_gallery(folder, 20)
    Gallery(folder, tmp_path / "idx").index(["phash"], progress=False)
    # the benchmark's loop: one writer re-indexing phash (adding and removing a file), one reader on a
    # shared Gallery (as the app), one opening a fresh Gallery per search (as `lens search`)
    outcome = run_threads(folder, tmp_path / "idx", seconds=4.0, readers=2)
    assert outcome["errors"] == {}, outcome["examples"]
    assert outcome["searches"] > 20 and outcome["builds"] > 3  # both sides really ran against each other
    left = len(list((tmp_path / "idx" / "phash").glob("build-*")))
    assert left <= 3  # superseded builds are removed once no reader is opening them


def test_a_build_is_kept_while_a_reader_opens_it_and_removed_after(tmp_path):
    folder = tmp_path / "photos"
    write_gallery(folder, 4)
    gallery = Gallery(folder, tmp_path / "idx")
    gallery.index(["phash"], progress=False)
    method_dir = gallery.method_dir("phash")
    opened = gallery.open("phash")
    with reading(method_dir) as held:
        make_picture(50).save(folder / "new.png")
        gallery.index(["phash"], progress=False)
        assert live_build(method_dir) != held and held.is_dir()  # published, but the old one is held
    gallery.index(["phash"], progress=False)
    assert not held.exists() and len(list(method_dir.glob("build-*"))) == 1
    # an index opened before both rebuilds still answers (its files stay mapped), and the gallery
    # itself moves to the new build
    assert opened.index.search(np.asarray(opened.vectors[:1]), 1)[0][0][0] == 0
    assert len(gallery.open("phash").items) == 5


# -- 3. content changed in place, size and mtime kept ----------------------------------------------------
def test_a_picture_rewritten_with_the_same_size_and_mtime_is_embedded_again(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(4):
        make_picture(seed, (64, 48)).save(folder / f"p{seed}.bmp")
    gallery = Gallery(folder, tmp_path / "idx")
    gallery.index(["phash"], progress=False)
    target = folder / "p0.bmp"
    before = target.stat()
    make_picture(77, (64, 48)).save(target)  # another picture, same byte size (BMP)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # as cp -p / rsync -t do
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    [report] = gallery.index(["phash"], progress=False)
    assert (report.embedded, report.reused) == (1, 3)
    [hit] = gallery.search(make_picture(77, (64, 48)), "phash", k=1)
    assert (hit.path, hit.score) == ("p0.bmp", 1.0)
    [again] = gallery.index(["phash"], progress=False)  # nothing changed now: all reused
    assert (again.embedded, again.reused) == (0, 4)


# -- 4. symbolic links ------------------------------------------------------------------------------------
def _linked_gallery(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    write_gallery(folder, 3)
    elsewhere = tmp_path / "phone"
    write_gallery(elsewhere, 2, start_seed=40)
    make_picture(60).save(tmp_path / "deleted.png")
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")
    (tmp_path / "deleted.png").unlink()  # a dangling file link
    (folder / "loop.png").symlink_to(folder / "loop.png")  # a link to itself
    (folder / "phone").symlink_to(elsewhere, target_is_directory=True)  # a linked folder
    (folder / "nested" / "up").symlink_to(folder, target_is_directory=True)  # a loop back to the root
    return folder


def test_symlinks_broken_links_are_skipped_and_linked_folders_followed_once(tmp_path, caplog):
    folder = _linked_gallery(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lens"):
        [report] = Gallery(folder, tmp_path / "idx").index(["phash"], progress=False)
    indexed = {item.path for item in Gallery(folder, tmp_path / "idx").open("phash").items}
    assert indexed == {"img000.jpg", "img001.png", "nested/img002.jpg", "phone/img040.jpg", "phone/img041.png"}
    reasons = dict(report.skipped)
    assert "broken symbolic link" in reasons["gone.png"] and "loop" in reasons["loop.png"]
    assert "scanned already" in reasons["nested/up"]
    assert "gone.png" in caplog.text
    done = lens("index", "photos", "--methods", "phash", "--quiet", cwd=tmp_path)
    assert done.returncode == 0 and b"Traceback" not in done.stderr
    assert b"5 images indexed" in done.stdout and b"3 skipped" in done.stdout
    assert b"skipped gone.png: broken symbolic link" in done.stdout


def test_the_app_builds_a_gallery_with_symlinks_and_shows_linked_files(tmp_path):
    from lens.service import LensService

    folder = _linked_gallery(tmp_path)
    service = LensService(Gallery(folder, tmp_path / "idx"), ["phash"])
    service.start(background=False)
    assert [s.status for s in service.states()] == ["ready"]
    outcome = service.search(make_picture(41), "phash", k=1)
    assert outcome.results[0].path == "phone/img041.png"
    assert service.thumbnail(outcome.results[0]).is_file()


# -- 5. file names that are not valid UTF-8 --------------------------------------------------------------
LATIN1 = b"caf\xe9.png"


def test_non_utf8_file_names_work_end_to_end(tmp_path):
    from lens.service import LensService

    folder = tmp_path / "photos"
    write_gallery(folder, 3)
    name = os.fsdecode(LATIN1)
    try:
        make_picture(70).save(folder / name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take non-UTF-8 names")
    env = {"PYTHONIOENCODING": "utf-8"}  # strict UTF-8 stdout, as under en_US.UTF-8
    gallery = Gallery(folder, index_dir_seen_from(tmp_path, folder))
    [report] = gallery.index(["phash"], progress=False)
    assert report.count == 4
    query = folder / name
    table = lens("search", os.fsencode(query).decode("utf-8", "surrogateescape"), "--gallery", "photos",
                 "--method", "phash", "-k", "2", cwd=tmp_path, **env)
    assert table.returncode == 0, table.stderr
    assert b"photos/" + LATIN1 in table.stdout  # the name's own bytes, as ls would print them
    found = lens("search", str(query), "--gallery", "photos", "--method", "phash", "--json", cwd=tmp_path, **env)
    assert found.returncode == 0, found.stderr
    results = json.loads(found.stdout.decode("ascii"))  # JSON output is ASCII, with \udcXX escapes
    assert os.fsencode(results[0]["path"]) == os.fsencode(Path("photos") / name)  # lossless
    # the manifest's items keep the name losslessly; the app shows it (thumbnail and caption)
    stored = gallery.open("phash")
    assert name in {item.path for item in stored.items}
    assert "\\udce9" in (stored.folder / ITEMS).read_text(encoding="ascii")
    service = LensService(gallery, ["phash"])
    service.start(background=False, build_missing=False)
    [hit] = service.search(make_picture(70), "phash", k=1).results
    assert hit.path == name and service.thumbnail(hit).is_file()
    import app

    assert app._name(hit.path) == "caf\\xe9.png" and app._outcome_json(
        service.search(make_picture(70), "phash", k=1))["results"][0]["image"].encode("utf-8")


# -- 6. extreme aspect ratios ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(16000, 1), (1, 16000), (6000, 2), (3000, 100)])
def test_strips_are_bounded_whatever_their_shape(tmp_path, size):
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 30, 30)).save(path)
    image = load_image(path)
    width, height = image.size
    assert max(width, height) <= MAX_STRIP_SIDE and max(width, height) <= MAX_ASPECT * min(width, height)
    # the picture is at the top left (pixel coordinates keep their meaning), white padding after it
    assert image.getpixel((0, 0)) == (200, 30, 30) and image.getpixel((width - 1, height - 1)) == (255, 255, 255)
    ordinary = make_picture(1, (640, 480))
    assert load_image(ordinary) is ordinary or load_image(ordinary).size == (640, 480)  # photos untouched


def test_a_strip_query_and_strip_gallery_files_cost_what_a_photo_costs(tmp_path, tiny_resnet):
    import tracemalloc

    folder = tmp_path / "photos"
    write_gallery(folder, 4)
    Image.new("RGB", (6000, 2), (10, 200, 10)).save(folder / "strip-a.png")
    Image.new("RGB", (2, 6000), (10, 10, 200)).save(folder / "strip-b.png")  # a column: other hash
    gallery = Gallery(folder, tmp_path / "idx", models={"resnet50": str(tiny_resnet)})
    methods = ["phash", "dhash", "ahash", "resnet50"]  # sift: too few keypoints in 6 tiny images to fit
    for report in gallery.index(methods, progress=False):
        assert report.count == 6 and report.skipped == []
    query = tmp_path / "query.png"
    Image.new("RGB", (16000, 1), (10, 200, 10)).save(query)
    for method in methods:
        gallery.search(query, method, k=1)  # loads the method first
        tracemalloc.start()
        results = gallery.search(query, method, k=2)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert results, method
        assert peak < 64 * 2**20, (method, peak)  # a 16000x1 query must not cost gigabytes
    hits = gallery.search(folder / "strip-b.png", "phash", k=6)
    assert "strip-b.png" in {hit.path for hit in hits if hit.score == 1.0}  # a strip finds itself


# -- 7. every format the decoder registers ---------------------------------------------------------------
def test_avif_and_heic_gallery_files_are_indexed(tmp_path):
    from PIL import features

    folder = tmp_path / "photos"
    write_gallery(folder, 2)
    written = []
    if features.check("avif"):
        make_picture(80).save(folder / "photo.avif", quality=90)
        written.append("photo.avif")
    try:
        make_picture(81).save(folder / "photo.heic", quality=90)
        written.append("photo.heic")
    except (KeyError, OSError, ValueError):
        pass  # no HEIF encoder here: the decoder still registers .heic (checked below)
    found = {p.name for p in iter_image_files(folder)}
    assert set(written) <= found
    assert {".avif", ".heic", ".heif", ".jpg", ".png", ".webp", ".tif"} <= set(
        __import__("lens.images", fromlist=["IMAGE_EXTENSIONS"]).IMAGE_EXTENSIONS)
    (folder / "vector.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    assert "vector.eps" not in {p.name for p in iter_image_files(folder)}  # never handed to Ghostscript
    with pytest.raises(ImageError):
        load_image(folder / "vector.eps")
    [report] = Gallery(folder, tmp_path / "idx").index(["phash"], progress=False)
    assert report.count == 2 + len(written) and report.skipped == []
    readme = (REPO / "README.md").read_text()
    assert "AVIF" in readme and "HEIC" in readme


# -- 8. degenerate boxes ---------------------------------------------------------------------------------
BAD_BOXES = [
    ((math.nan,) * 4, "finite"),
    ((0, 0, math.inf, math.inf), "finite"),
    ((700, 10, 20, 900), "no area"),
    ((10, 10, 10, 40), "no area"),
    ((1000, 1000, 2000, 2000), "outside"),
]


@pytest.mark.parametrize("box, why", BAD_BOXES)
def test_degenerate_boxes_are_refused_by_the_one_validation(box, why):
    with pytest.raises(ImageError, match=why):
        check_box(box, (96, 80))


def test_degenerate_boxes_are_refused_at_every_entry_point(tmp_path):
    import app
    from lens.detect import DEFAULT_MARGIN
    from lens.images import crop
    from lens.types import Box
    from lens.service import LensService

    folder = tmp_path / "photos"
    write_gallery(folder, 3)
    gallery = Gallery(folder, tmp_path / "idx")
    gallery.index(["phash"], progress=False)
    service = LensService(gallery, ["phash"])
    service.start(background=False, build_missing=False)
    picture = make_picture(0)
    for box, why in BAD_BOXES:
        with pytest.raises(ImageError, match=why):
            gallery.search(picture, "phash", box=box)
        with pytest.raises(ImageError, match=why):
            crop(picture, box, DEFAULT_MARGIN)  # detected boxes, and eval --detect
        with pytest.raises(ImageError, match=why):
            service.search(picture, "phash", box=Box(*box))
        if why != "outside":  # the app's API checks what it can before the image is known
            with pytest.raises(ImageError, match=why):
                app._box_from(list(box))
    for text in ("nan,nan,nan,nan", "700,10,20,900"):
        done = lens("search", "photos/img000.jpg", "--gallery", "photos", "--index-dir", "idx",
                    "--method", "phash", "--box", text, cwd=tmp_path)
        assert done.returncode == 1 and done.stderr.startswith(b"lens: error: box"), done.stderr
    assert gallery.search(picture, "phash", k=1, box=(0, 0, 48, 40))  # a good box still works


# -- also: a result whose file was deleted since indexing ------------------------------------------------
def test_results_whose_file_is_gone_are_dropped_with_a_hint(tmp_path, caplog):
    folder = tmp_path / "photos"
    write_gallery(folder, 4)
    gallery = Gallery(folder, tmp_path / "idx")
    gallery.index(["phash"], progress=False)
    (folder / "img001.png").unlink()
    with caplog.at_level(logging.WARNING, logger="lens"):
        results = gallery.search(make_picture(1), "phash", k=4)
    assert [r.path for r in results] and "img001.png" not in [r.path for r in results]
    assert [r.rank for r in results] == list(range(1, len(results) + 1))
    assert "deleted since the index was built" in caplog.text and "lens index" in caplog.text
    shutil.rmtree(folder / "nested")
    assert all(r.file.is_file() for r in gallery.search(make_picture(0), "phash", k=4))
