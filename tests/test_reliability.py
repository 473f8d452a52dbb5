"""Bad inputs, crashes and concurrent writers: nothing is lost and every failure says what happened."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bad_inputs import bad_input_corpus
from conftest import REPO, index_dir_seen_from, shared_path, write_gallery

from lens import Gallery
from lens.errors import CorruptIndexError
from lens.images import ImageError, load_image


def test_every_bad_input_decodes_or_fails_clearly(tmp_path):
    expect = bad_input_corpus(tmp_path)
    for name, ok in expect.items():
        if ok:
            image = load_image(tmp_path / name)
            assert image.mode == "RGB" and min(image.size) >= 1, name
        else:
            with pytest.raises(ImageError) as caught:
                load_image(tmp_path / name)
            assert name in str(caught.value), caught.value
    assert load_image(tmp_path / "rotated.jpg").size == (48, 64)  # EXIF orientation applied


def test_indexing_a_folder_of_bad_inputs_completes_and_reports_skips(tmp_path, tiny_resnet):
    expect = bad_input_corpus(tmp_path / "photos")
    gallery = Gallery(tmp_path / "photos", tmp_path / "idx", models={"resnet50": str(tiny_resnet)})
    [report] = gallery.index(["resnet50"], progress=False)
    assert sorted(path for path, _ in report.skipped) == sorted(n for n, ok in expect.items() if not ok)
    assert report.count == sum(expect.values())


@pytest.mark.shared
def test_shared_format_fixtures_index(tmp_path, tiny_resnet):
    folder = shared_path("data", "near-duplicates", "formats_images")
    gallery = Gallery(folder, tmp_path / "idx", models={"resnet50": str(tiny_resnet)})
    [report] = gallery.index(["resnet50"], progress=False)
    assert report.count + len(report.skipped) == len(list(folder.iterdir()))
    assert all("truncated" in why for _, why in report.skipped)


def _lens(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lens", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_during_index_leaves_the_previous_index_loadable(tmp_path, tiny_resnet):
    photos = tmp_path / "photos"
    write_gallery(photos, 6)
    model = ["--model", f"resnet50={tiny_resnet}"]
    first = _lens("index", "photos", *model, cwd=tmp_path)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    write_gallery(photos / "more", 300, start_seed=1000)
    second = _lens("index", "photos", "--batch-size", "4", "--workers", "1", *model, cwd=tmp_path)
    seen, deadline = "", time.time() + 120
    while second.poll() is None and time.time() < deadline:  # wait until it is embedding, then kill it
        ready, _, _ = select.select([second.stderr], [], [], 1.0)
        if ready:
            seen += os.read(second.stderr.fileno(), 4096).decode(errors="replace")  # tqdm redraws with \r
            if re.search(r"\b([1-9]\d*)/300\b", seen):  # 300 new images to embed
                break
    assert second.poll() is None, f"the build ended before it could be killed: {seen[-500:]}"
    os.kill(second.pid, signal.SIGKILL)
    second.wait(timeout=30)
    assert second.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    gallery = Gallery(photos, index_dir_seen_from(tmp_path, photos), models={"resnet50": str(tiny_resnet)})
    assert len(gallery.open("resnet50").items) == 6
    assert gallery.search(photos / "img000.jpg", "resnet50", k=1)[0].path == "img000.jpg"
    [report] = gallery.index(["resnet50"], progress=False)  # and the next run completes the job
    assert report.count == 306


def test_altered_or_truncated_index_files_are_detected(tmp_path, tiny_resnet):
    write_gallery(tmp_path / "photos", 6)
    gallery = Gallery(tmp_path / "photos", tmp_path / "idx", models={"resnet50": str(tiny_resnet)})
    [report] = gallery.index(["resnet50"], progress=False)
    index_file = report.folder / "index.ann"
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index_file.write_bytes(bytes(data))
    fresh = Gallery(gallery.root, gallery.index_dir, models=gallery.models)
    with pytest.raises(CorruptIndexError, match="damaged.*lens index"):
        fresh.open("resnet50")
    index_file.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptIndexError, match="damaged"):
        Gallery(gallery.root, gallery.index_dir, models=gallery.models).open("resnet50")
    # re-indexing repairs it: the damaged build's cache is not trusted
    [again] = fresh.index(["resnet50"], progress=False)
    assert again.embedded == 6 and len(fresh.open("resnet50").items) == 6


def test_two_concurrent_index_runs_do_not_corrupt_each_other(tmp_path, tiny_resnet):
    write_gallery(tmp_path / "photos", 40)
    model = ["--model", f"resnet50={tiny_resnet}", "--batch-size", "4"]
    runs = [_lens("index", "photos", *model, cwd=tmp_path) for _ in range(2)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    gallery = Gallery(tmp_path / "photos", index_dir_seen_from(tmp_path, tmp_path / "photos"),
                      models={"resnet50": str(tiny_resnet)})
    stored = gallery.open("resnet50")  # verifies every checksum
    assert len(stored.items) == 40 and len(stored.index) == 40
    builds = [p for p in (gallery.index_dir / "resnet50").iterdir() if p.name.startswith(("build-", ".staging"))]
    assert len(builds) == 1


def test_methods_open_two_at_a_time_in_a_fresh_process(tmp_path, tiny_resnet, tiny_dinov2):
    """Start-up opens methods on two threads: first imports and ONNX exports must not race."""
    photos = tmp_path / "photos"
    write_gallery(photos, 6)
    models = {"resnet50": str(tiny_resnet), "vit": str(tiny_dinov2)}
    Gallery(photos, tmp_path / "idx", models=models).index(["resnet50", "vit", "phash"], progress=False)
    script = (
        "import json, sys\n"
        "from lens import Gallery\n"
        "from lens.service import LensService\n"
        f"gallery = Gallery({str(photos)!r}, {str(tmp_path / 'idx')!r}, models={models!r})\n"
        "service = LensService(gallery, ['resnet50', 'vit', 'phash'])\n"
        "service.start(background=False, build_missing=False)\n"
        "print(json.dumps([[s.name, s.status, s.detail] for s in service.states()]))\n"
        "print(json.dumps([gallery.method(m).runtime for m in ('resnet50', 'vit')]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "LENS_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    states, runtimes = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert [status for _, status, _ in states] == ["ready"] * 3, states
    assert runtimes == ["onnxruntime", "onnxruntime"], done.stderr  # no export fell back to PyTorch
