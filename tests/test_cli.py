"""The `lens` command as a user runs it: a real subprocess, real files, exit codes and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, index_dir_seen_from, shared_path, write_gallery


def lens(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lens", *args], cwd=cwd, env=env, input=stdin,
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
    photos = sorted((data / "mixed_images").iterdir())
    variants = [p for p in photos if "_corrupt" not in p.name]
    assert len(variants) >= 4 and len(photos) > len(variants)
    # one call for every photo (the model loads once, issue #18); the corrupt one is reported, exit 1
    found = lens("search", *map(str, photos), "--gallery", str(data / "base_images"), "--method", method,
                 "--index-dir", "idx", "-k", "1", "--json", cwd=tmp_path)
    assert found.returncode == 1 and "_corrupt.jpg' is not an image" in found.stderr, found.stderr
    lines = [json.loads(line) for line in found.stdout.splitlines()]
    assert [line["query"] for line in lines] == list(map(str, photos))
    for photo, line in zip(photos, lines):
        if photo in variants:
            original = photo.name.split("_")[0].removesuffix(".jpg") + ".jpg"
            assert Path(line["results"][0]["path"]).name == original, photo.name
        else:
            assert "results" not in line and "is not an image" in line["error"]


# -- many photos in one call (issue #18) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def hashed(tmp_path_factory) -> Path:
    """8 generated photos (3 of them in photos/nested) indexed with phash: no model to load."""
    from lens.gallery import Gallery

    root = tmp_path_factory.mktemp("batch")
    write_gallery(root / "photos", 8)
    Gallery(root / "photos", root / "idx").index(["phash"], progress=False)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


PHASH = ("--gallery", "photos", "--index-dir", "idx", "--method", "phash", "-k", "3")


def test_one_call_searches_every_photo_and_a_bad_one_does_not_stop_the_rest(hashed):
    queries = ["photos/img000.jpg", "broken.jpg", "photos/img001.png", "missing.jpg", "photos/nested/img002.jpg"]
    done = lens("search", *queries, *PHASH, "--json", cwd=hashed)
    assert done.returncode == 1  # some photos failed (the rule in --help)
    lines = json_lines(done.stdout)
    assert [line["query"] for line in lines] == queries  # one object per photo, in input order
    assert "broken.jpg" in lines[1]["error"] and "missing.jpg" in lines[3]["error"]
    for line in (lines[0], lines[2], lines[4]):
        assert [r["rank"] for r in line["results"]] == [1, 2, 3]
        assert line["results"][0]["path"] == line["query"] and line["results"][0]["score"] == 1.0
    assert "lens: error: 'broken.jpg'" in done.stderr and "2 of 5 query photos" in done.stderr
    assert "Traceback" not in done.stderr


def test_photos_from_stdin_and_folders_mixed(hashed):
    done = lens("search", "-", "photos/nested", *PHASH, "--json", cwd=hashed,
                stdin="photos/img003.png\n\nphotos/img004.jpg\n")
    assert done.returncode == 0, done.stderr
    assert [line["query"] for line in json_lines(done.stdout)] == [
        "photos/img003.png", "photos/img004.jpg", "photos/nested/img002.jpg", "photos/nested/img005.png"]
    table = lens("search", "photos", *PHASH, "--batch-size", "3", cwd=hashed)  # a folder: 8 photos, 3 batches
    assert table.returncode == 0, table.stderr
    sections = table.stdout.strip().split("\n\n")
    assert len(sections) == 8 and all(section.startswith("query: photos/") for section in sections)
    assert all(len(section.splitlines()) == 2 + 3 for section in sections)  # query, header, 3 results


def test_no_photos_and_box_with_many_are_errors(hashed):
    empty = lens("search", "-", *PHASH, cwd=hashed, stdin="")
    assert empty.returncode == 1 and "no query photos" in empty.stderr
    boxed = lens("search", "photos/img000.jpg", "photos/img001.png", "--box", "0,0,9,9", *PHASH, cwd=hashed)
    assert boxed.returncode == 1 and "exactly one QUERY photo" in boxed.stderr


def test_a_batch_finds_what_one_photo_at_a_time_finds(tmp_path, tiny_resnet, capsys):
    """Photos embedded together (batches of 2) give each photo the results of searching it alone."""
    from lens.cli import main

    write_gallery(tmp_path / "photos", 5)
    args = ["--gallery", str(tmp_path / "photos"), "--index-dir", str(tmp_path / "idx"), "--method", "resnet50",
            "--model", f"resnet50={tiny_resnet}", "-k", "4", "--json"]
    assert main(["index", str(tmp_path / "photos"), "--methods", "resnet50", "--out", str(tmp_path / "idx"),
                 "--model", f"resnet50={tiny_resnet}", "--quiet"]) == 0
    queries = [str(p) for p in sorted((tmp_path / "photos").glob("*.*"))]
    capsys.readouterr()
    assert main(["search", *queries, "--batch-size", "2", *args]) == 0
    batched = json_lines(capsys.readouterr().out)
    assert len(batched) == len(queries) == 4
    for query, line in zip(queries, batched):
        assert main(["search", query, *args]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert line["query"] == query
        assert [r["path"] for r in line["results"]] == [r["path"] for r in alone]
        assert [r["score"] for r in line["results"]] == pytest.approx([r["score"] for r in alone], abs=1e-5)


def test_a_hash_search_starts_without_torch_opencv_or_faiss(hashed):
    """Start-up is what the method needs: phash on an Annoy index imports no deep-learning library."""
    check = ("import sys; from lens.cli import main; code = main(sys.argv[1:]); "
             "heavy = sorted({'torch', 'transformers', 'cv2', 'faiss', 'ultralytics', 'gradio', 'matplotlib'} "
             "& set(sys.modules)); print(heavy); raise SystemExit(code)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", check, "search", "photos/img000.jpg", *PHASH], cwd=hashed,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("[]"), done.stdout


def test_the_method_table_says_which_module_registers_each_name():
    """The table that lets a spec import only its own family matches what the families register."""
    from lens import methods

    methods.list_methods()  # imports every family
    tabled = {name: family for family, names in methods._FAMILIES.items() for name in names}
    registered = {name: factory for name, factory in
                  [*methods._NAMES.items(), *((f"{prefix}:", f) for prefix, f in methods._PREFIXES.items())]
                  if factory.__module__.startswith("lens.methods.")}  # not the stand-ins other tests register
    assert set(tabled) == set(registered)
    for name, factory in registered.items():
        assert factory.__module__ == f"lens.methods.{tabled[name]}", name


def test_a_method_that_cannot_be_built_does_not_stop_the_others(tmp_path, capsys):
    """Offline, the default `lens index DIR` (resnet50,local) stopped at resnet50's download error and
    built nothing, not even `local`, which needs no model. Now the others are built, the failure is a
    line on stderr and the exit status is 1; nothing built at all is the one error, as before."""
    from lens.cli import main

    write_gallery(tmp_path / "photos", 4)
    common = [str(tmp_path / "photos"), "--out", str(tmp_path / "idx"), "--quiet",
              "--model", f"resnet50={tmp_path / 'no-such-model'}"]
    assert main(["index", *common, "--methods", "resnet50,phash"]) == 1
    out, err = capsys.readouterr()
    assert "phash: 4 images indexed" in out and (tmp_path / "idx" / "phash" / "CURRENT").is_file()
    assert "lens: error: resnet50 not indexed: cannot load model" in err and "Traceback" not in err
    assert not (tmp_path / "idx" / "resnet50" / "CURRENT").exists()
    assert main(["index", *common, "--methods", "resnet50"]) == 1
    out, err = capsys.readouterr()
    assert err.count("lens: error:") == 1 and "cannot load model" in err and "not indexed" not in err
    assert main(["index", *common, "--methods", "phash,nonsense"]) == 1  # refused before anything is built
    assert "unknown method" in capsys.readouterr().err
