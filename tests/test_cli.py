"""The `lens` command as a user runs it: a real subprocess, real files, exit codes and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, index_dir_seen_from, shared_path, write_gallery



def lens(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lens", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_index_then_search_as_a_user(tmp_path, tiny_resnet, tiny_dinov2):
    photos = tmp_path / "photos"
    write_gallery(photos, 8)
    models = ["--model", f"resnet50={tiny_resnet}", "--model", f"vit={tiny_dinov2}"]
    done = lens("index", "photos", "--methods", "resnet50,vit", *models, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resnet50: 8 images indexed (8 embedded, 0 reused, 0 skipped)" in done.stdout
    assert "img/s" in done.stderr  # the progress bar shows the speed
    index_dir = index_dir_seen_from(tmp_path, photos)  # indexes/photos-<hash of its resolved path>
    assert index_dir.name.startswith("photos-")
    assert (index_dir / "resnet50" / "CURRENT").is_file()
    assert (index_dir / "vit" / "CURRENT").is_file()

    found = lens("search", "photos/nested/img002.jpg", "--gallery", "photos", "--method", "vit", "-k", "3",
                 "--json", *models, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    results = json.loads(found.stdout)
    assert [r["rank"] for r in results] == [1, 2, 3]
    assert results[0]["path"] == "photos/nested/img002.jpg"
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)

    table = lens("search", "photos/img001.png", "--gallery", "photos", "--method", "resnet50",
                 "--box", "0,0,60,60", "-k", "2", *models, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.strip().splitlines()) == 3  # header + 2 results


def test_bad_query_is_a_clear_error_not_a_traceback(tmp_path):
    write_gallery(tmp_path / "photos", 2)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    done = lens("search", "broken.jpg", "--gallery", "photos", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("lens: error:") and "broken.jpg" in done.stderr
    assert "Traceback" not in done.stderr


def test_errors_for_missing_index_empty_folder_and_bad_options(tmp_path, tiny_resnet):
    write_gallery(tmp_path / "photos", 2)
    (tmp_path / "empty").mkdir()
    model = ["--model", f"resnet50={tiny_resnet}"]
    cases = [
        (["search", "photos/img000.jpg", "--gallery", "photos", *model], "lens index"),
        (["index", "empty", *model], "no images found"),
        (["index", "photos", "--methods", "nonsense"], "unknown method"),
        (["search", "photos/img000.jpg", "--gallery", "photos", "--box", "1,2,3", *model], "--box"),
        (["index", "photos", "--model", "resnet50"], "NAME=PATH"),
    ]
    for args, message in cases:
        done = lens(*args, cwd=tmp_path)
        assert done.returncode == 1, (args, done.stdout)
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


@pytest.mark.shared
def test_shared_near_duplicates_find_their_original(tmp_path):
    """Real EfficientNet-Lite0 weights: each flipped/resized/rotated copy retrieves its original first."""
    weights = shared_path("weights", "efficientnet_lite0.in1k")
    data = shared_path("data", "near-duplicates")
    method = f"hf:{weights}"
    done = lens("index", str(data / "base_images"), "--methods", method, "--out", "idx", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    variants = [p for p in sorted((data / "mixed_images").iterdir()) if "_corrupt" not in p.name]
    assert len(variants) >= 4
    for variant in variants:
        found = lens("search", str(variant), "--gallery", str(data / "base_images"), "--method", method,
                     "--index-dir", "idx", "-k", "1", "--json", cwd=tmp_path)
        assert found.returncode == 0, found.stderr
        original = variant.name.split("_")[0].removesuffix(".jpg") + ".jpg"
        assert Path(json.loads(found.stdout)[0]["path"]).name == original, variant.name
