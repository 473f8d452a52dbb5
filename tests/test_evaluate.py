"""`lens eval` on generated datasets, in both layouts, through the CLI.

One test runs the real `lens` process; the others call the same command line in this process
(:func:`lens.cli.main`, fixture ``lens_eval``), which keeps loaded models and skips a Python start-up
per run, and trainable methods train for one epoch (fixture ``one_epoch``): what they learn from is
checked, not how well.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import make_picture, write_gallery
from PIL import Image, ImageDraw, ImageOps
from test_cli import lens

from lens import training
from lens.cli import main
from lens.evaluation.datasets import DISTRACTOR_PREFIX, distractor_files, load_dataset
from lens.evaluation.evaluate import eval_gallery, evaluate_method, load_queries
from lens.evaluation.metrics import average_precision, hit_at_k
from lens.gallery import Gallery
from lens.types import Box


@pytest.fixture
def lens_eval(monkeypatch, capsys):
    """``lens_eval(*args, cwd=...)``: ``lens eval ARGS`` run from ``cwd`` in this process, as a
    CompletedProcess (exit code, stdout, stderr)."""

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main(["eval", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["lens", "eval", *args], code, out, err)

    return run


@pytest.fixture
def one_epoch(monkeypatch):
    """Every trainer's defaults cut to one epoch: `lens eval` trains trainable methods with them."""
    for kind, trainer in training.TRAINERS.items():
        monkeypatch.setitem(training.TRAINERS, kind, replace(trainer, defaults=replace(trainer.defaults, epochs=1)))


def _class_folders(root, splits=("train", "test"), per_class=(4, 2)):
    for split, count in zip(splits, per_class):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                make_picture(100 * c + 10 * i + len(split)).save(folder / f"{split}{i}.png")


def test_split_dataset_layout(tmp_path):
    _class_folders(tmp_path / "shapes")
    dataset = load_dataset(tmp_path / "shapes")
    assert len(dataset.gallery) == 12 and len(dataset.queries) == 6
    query = dataset.queries[0]
    assert dataset.relevant[query] == {f"{query.parent.name}/train{i}.png" for i in range(4)}
    assert dataset.train_root == tmp_path / "shapes" / "train"


def test_leave_one_out_never_counts_the_query(tmp_path):
    _class_folders(tmp_path / "flat", splits=("",), per_class=(3,))
    dataset = load_dataset(tmp_path / "flat")
    query = dataset.queries[0]
    own = dataset.exclude[query]
    assert own not in dataset.relevant[query] and len(dataset.relevant[query]) == 2


def test_eval_report_on_groundtruth_dataset(tmp_path, tiny_resnet):
    data = tmp_path / "dups"
    (data / "images").mkdir(parents=True)
    for i in range(6):
        make_picture(i).save(data / "images" / f"{i}.png")
    shutil.copy(data / "images" / "0.png", data / "images" / "0-copy.png")
    (data / "groundtruth.json").write_text(json.dumps(
        {"queries": {"0.png": ["0-copy.png"], "3.png": []}}))
    done = lens("eval", str(data), "--methods", "resnet50,unknown-method", "--model", f"resnet50={tiny_resnet}",
                "--out", "report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "report"
    results = json.loads((out / "results.json").read_text())
    by_method = {m["method"]: m for m in results["methods"]}
    resnet = by_method["resnet50"]
    # the duplicate is found first once the query itself is left out: AP 1 (0.5 if it counted itself)
    assert resnet["map"] == pytest.approx(1.0)
    assert resnet["queries_scored"] == 1 and resnet["queries_without_relevant"] == 1
    assert resnet["recall"]["1"] == pytest.approx(1.0)
    assert resnet["ann_recall_at_10"] == pytest.approx(1.0)
    assert resnet["index_bytes"] > 0 and resnet["query_ms_p50"] > 0
    assert "unknown method" in by_method["unknown-method"]["error"]
    assert results["versions"]["torch"] and results["hardware"]["cores"]
    for name in ("report.md", "map_vs_latency.png", "pr_curves.png", "samples.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "| resnet50 | 1.000 |" in report and "unknown-method failed" in report
    assert "resnet50" in done.stdout and "mAP" in done.stdout


def test_eval_with_class_folders_and_top(tmp_path, tiny_resnet, lens_eval):
    _class_folders(tmp_path / "shapes")
    done = lens_eval("shapes", "--methods", "resnet50", "--model", f"resnet50={tiny_resnet}", "--top", "3",
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "eval" / "shapes" / "results.json").read_text())
    [method] = results["methods"]
    assert 0.0 <= method["map"] <= 1.0 and method["queries_scored"] == 6
    assert results["config"]["top"] == 3


def test_eval_trains_trainable_methods_on_the_training_split_only(tmp_path, lens_eval, one_epoch):
    _class_folders(tmp_path / "shapes")
    done = lens_eval("shapes", "--methods", "autoencoder", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "eval" / "shapes" / "results.json").read_text())
    [method] = results["methods"]
    assert method["error"] is None and 0.0 <= method["map"] <= 1.0
    assert "trained on 12 images: the dataset's 12 gallery images in shapes/train" in method["data_seen"]
    manifest = json.loads((tmp_path / "eval" / "shapes" / "models" / "autoencoder" / "manifest.json").read_text())
    assert manifest["data"]["images"] == 12  # the 6 test images were never seen
    assert "trained on 12 images" in (tmp_path / "eval" / "shapes" / "report.md").read_text()


# -- the gallery is exactly the dataset's gallery (issue #15) ----------------------------------------
def _textured(seed: int, size: tuple[int, int] = (192, 144)) -> Image.Image:
    """A picture with many shapes and some noise: corners and blobs enough for SIFT keypoints."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x1, y1 = int(rng.integers(0, size[0] - 10)), int(rng.integers(0, size[1] - 10))
        x2, y2 = x1 + int(rng.integers(6, 40)), y1 + int(rng.integers(6, 40))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x1, y1, x2, y2), fill=colour)
    noise = rng.integers(-12, 13, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8))


def _flipped_copies_dataset(root: Path, count: int = 20) -> Path:
    """The issue's reproduction: images/gallery/ (count photos), images/queries/ (a flipped copy of each),
    groundtruth.json listing the gallery and mapping each copy to its original."""
    for folder in ("gallery", "queries"):
        (root / "images" / folder).mkdir(parents=True)
    truth = {"gallery": [], "queries": {}}
    for i in range(count):
        picture = _textured(i)
        picture.save(root / "images" / "gallery" / f"{i:02d}.png")
        ImageOps.mirror(picture).save(root / "images" / "queries" / f"{i:02d}.png")
        truth["gallery"].append(f"gallery/{i:02d}.png")
        truth["queries"][f"queries/{i:02d}.png"] = [f"gallery/{i:02d}.png"]
    (root / "groundtruth.json").write_text(json.dumps(truth))
    return root


def _scores_of_gallery_alone(folder: Path, queries: list[Path], method: str, models: dict[str, str]) -> dict:
    """mAP and R@k of indexing ``folder`` alone with lens.Gallery and searching it with each query."""
    gallery = Gallery(folder, folder.parent / "alone-indexes", models=models)
    gallery.index([method], progress=False)
    size = len(gallery.open(method).items)
    aps, hits = [], {k: [] for k in (1, 5, 10)}
    for query in queries:
        results = gallery.search(query, method, k=size)
        relevant = [r.path == query.name for r in results]
        scores = [r.score for r in results]
        aps.append(average_precision(relevant, scores, 1))
        for k in hits:
            hits[k].append(hit_at_k(relevant, scores, k))
    return {"map": float(np.mean(aps)), **{str(k): float(np.mean(v)) for k, v in hits.items()}}, gallery


@pytest.mark.parametrize("method", ["deep", "sift"])
def test_eval_scores_exactly_the_datasets_gallery(tmp_path, tiny_resnet, method, lens_eval):
    data = _flipped_copies_dataset(tmp_path / "flips", count=12)
    spec = f"hf:{tiny_resnet}" if method == "deep" else "sift"
    done = lens_eval("flips", "--methods", spec, "--out", "report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    [measured] = results["methods"]
    assert measured["error"] is None and measured["queries_scored"] == 12
    assert results["gallery"] == {"dataset_images": 12, "distractors": 0, "indexed": 12}
    # the eval's index holds the 12 gallery images and nothing else (not the 12 queries beside them)
    evaluated = Gallery(data / "images", tmp_path / "report" / "indexes")
    assert sorted(item.path for item in evaluated.open(spec).items) == [f"gallery/{i:02d}.png" for i in range(12)]
    alone, gallery = _scores_of_gallery_alone(data / "images" / "gallery", sorted((data / "images" / "queries").iterdir()),
                                              spec, {})
    assert measured["map"] == pytest.approx(alone["map"], abs=1e-9)
    assert {k: measured["recall"][k] for k in ("1", "5", "10")} == pytest.approx(
        {k: alone[k] for k in ("1", "5", "10")}, abs=1e-9)
    if method == "sift":  # the visual vocabulary was learned from the 12 gallery images only
        np.testing.assert_array_equal(evaluated.method("sift").vocabulary, gallery.method("sift").vocabulary)
        assert "fitted on the dataset's 12 gallery images" in measured["data_seen"]
        report = (tmp_path / "report" / "report.md").read_text()
        assert "sift: RANSAC-verified keypoint matches (inliers)" in report and "sift: cosine" not in report
    else:  # a hf: path is named by its folder in the table, the full spec in a footnote
        report = (tmp_path / "report" / "report.md").read_text()
        written = f"hf:{os.path.relpath(tiny_resnet, tmp_path)}"  # no absolute path in the report
        assert f"| {tiny_resnet.name} |" in report and f"- `{tiny_resnet.name}` = `{written}`" in report


def test_trained_methods_learn_only_from_the_gallery_list(tmp_path, lens_eval, one_epoch):
    _flipped_copies_dataset(tmp_path / "flips", count=4)
    done = lens_eval("flips", "--methods", "autoencoder", "--out", "report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "report" / "models" / "autoencoder" / "manifest.json").read_text())
    assert manifest["data"]["images"] == 4 and manifest["data"]["labels"] == "none"  # never the 4 queries
    [measured] = json.loads((tmp_path / "report" / "results.json").read_text())["methods"]
    assert "trained on 4 images: the dataset's 4 gallery images in flips/images" in measured["data_seen"]


def test_distractors_join_the_gallery_and_are_never_relevant(tmp_path, tiny_resnet, lens_eval):
    data = _flipped_copies_dataset(tmp_path / "flips", count=8)
    extra = tmp_path / "extra"
    (extra / "nested").mkdir(parents=True)
    for i in range(5):  # exact copies of gallery images: as similar as can be, and still not relevant
        shutil.copy(data / "images" / "gallery" / f"{i:02d}.png", extra / ("nested" if i % 2 else "") / f"{i}.png")
    more = tmp_path / "more"
    write_gallery(more, 4, start_seed=50)
    (more / "notes.txt").write_text("not an image")
    dataset = load_dataset(data)
    distractors = distractor_files([extra, more], dataset)
    assert len(distractors) == 9 and not set(distractors) & set(dataset.gallery)
    assert all(key.startswith(DISTRACTOR_PREFIX) for key in distractors)
    gallery = eval_gallery(dataset, tmp_path / "work", distractors=distractors,
                           models={"resnet50": str(tiny_resnet)})
    queries = load_queries(dataset)
    result = evaluate_method(gallery, dataset, "resnet50", queries)
    assert len(gallery.open("resnet50").items) == 8 + 9
    for ranking in result.rankings:
        assert len(ranking.relevant) == 17 and ranking.relevant.sum() == 1 and ranking.n_relevant == 1
        assert not any(r for i, r in zip(ranking.ids, ranking.relevant) if i.startswith(DISTRACTOR_PREFIX))
    # through the CLI: counted in the report, no absolute path of this machine in what is written
    done = lens_eval("flips", "--methods", "resnet50", "--model", f"resnet50={tiny_resnet}",
                     "--distractors", "extra,more", "--out", "report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["gallery"] == {"dataset_images": 8, "distractors": 9, "indexed": 17}
    assert results["config"]["distractors"] == {"extra": 5, "more": 4}
    report = (tmp_path / "report" / "report.md").read_text()
    assert "17 images = the dataset's 8 gallery images + 9 distractors (5 in `extra`, 4 in `more`)" in report
    for text in (report, (tmp_path / "report" / "results.json").read_text()):
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text


def test_a_query_whose_detected_box_is_unusable_is_reported_and_skipped(tmp_path, caplog):
    """`lens eval --detect`: a detector box of NaNs (or one outside the photo) for one query skips that
    query with a warning naming it; the evaluation of every method goes on with the others."""
    dataset = load_dataset(_flipped_copies_dataset(tmp_path / "flips", count=4))
    boxes = iter([None, Box(math.nan, 5, 60, 60, "cat", 0.9), Box(10, 10, 120, 100), Box(500, 500, 600, 600)])
    skipped: list = []
    with caplog.at_level(logging.WARNING, logger="lens"):
        queries = load_queries(dataset, lambda picture: next(boxes), margin=0.05, skipped=skipped)
    first, nan_box, good, outside = dataset.queries
    assert [q.path for q in queries] == [first, good] and queries[1].box == Box(10, 10, 120, 100)
    assert [path for path, _ in skipped] == [nan_box, outside]
    assert "finite" in skipped[0][1] and "outside" in skipped[1][1]
    assert caplog.text.count("query skipped") == 2 and str(nan_box) in caplog.text
    gallery = eval_gallery(dataset, tmp_path / "work")
    result = evaluate_method(gallery, dataset, "phash", queries)
    assert result.error is None and len(result.rankings) == 2 and result.queries_scored == 2


def test_distractors_bad_folders_are_refused(tmp_path, lens_eval):
    _flipped_copies_dataset(tmp_path / "flips", count=3)
    (tmp_path / "empty").mkdir()
    for folder, message in (("missing", "distractor folder 'missing' does not exist"),
                            ("empty", "no images found in distractor folder 'empty'"),
                            ("flips/images/gallery", "holds images of the dataset itself")):
        done = lens_eval("flips", "--methods", "phash", "--distractors", folder, cwd=tmp_path)
        assert done.returncode == 1 and "lens: error: " in done.stderr and message in done.stderr, done.stderr


def test_report_names_methods_short_and_writes_no_absolute_paths(tmp_path, monkeypatch):
    from lens.evaluation.report import portable, short_names

    names = short_names(["phash", "hf:../weights/efficientnet_lite0.in1k/", "hf:facebook/dinov2-base",
                         "siamese:models/x/siamese", "hf:a/same", "hf:b/same"])
    assert names == {"phash": "phash", "hf:../weights/efficientnet_lite0.in1k/": "efficientnet_lite0.in1k",
                     "hf:facebook/dinov2-base": "dinov2-base", "siamese:models/x/siamese": "siamese:siamese",
                     "hf:a/same": "hf:a/same", "hf:b/same": "hf:b/same"}  # a shared short name: full specs
    (tmp_path / "work").mkdir()
    (tmp_path / "data" / "set" / "images").mkdir(parents=True)
    (tmp_path / "weights").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    text = (f"gallery {tmp_path}/data/set/images; model hf:{tmp_path}/weights, "
            f"out {tmp_path}/work/eval; R@1/5/10, 1 - distance / bits, /no/such/path")
    assert portable(text, "../data/set") == ("gallery ../data/set/images; model hf:../weights, out eval; "
                                            "R@1/5/10, 1 - distance / bits, /no/such/path")


@pytest.mark.parametrize("method", ["phash", "deep"])
def test_a_ranking_an_index_cut_short_is_completed_in_exact_search_order(tmp_path, tiny_resnet, method):
    """Regression: for k = the gallery size, FAISS HNSW32 returned 810 of clothing's 3,068 images, and
    every image it left out counted as never found in the full-ranking mAP (EfficientNet 0.463, not 0.53)."""
    from lens.evaluation.evaluate import complete_ranking
    from lens.images import load_image

    files = write_gallery(tmp_path / "g", 24)
    spec = "phash" if method == "phash" else f"hf:{tiny_resnet}"
    gallery = Gallery(tmp_path / "g", tmp_path / "idx")
    gallery.index([spec], progress=False)
    stored, searcher = gallery.open(spec), gallery.method(spec)
    picture = load_image(files[3])
    full = gallery.search(picture, spec, k=len(stored.items))  # 24 images: the default index is exact
    assert len(full) == len(stored.items) == 24
    own = full[-1].path  # left out, as the eval leaves out a query's own gallery image
    cut = full[:5]  # what an approximate index cut short would have returned
    paths, scores = complete_ranking([r.path for r in cut], [r.score for r in cut], stored, searcher,
                                     picture, own, depth=23)
    assert paths[:5] == [r.path for r in cut] and scores[:5] == [r.score for r in cut]
    assert len(paths) == len(set(paths)) == 23 and own not in paths
    assert set(paths) == {r.path for r in full} - {own}
    tail = np.asarray(scores[5:])
    assert (tail < min(scores[:5])).all() and (np.diff(tail) <= 0).all()  # below the ranked ones, best first
    if method == "deep":  # distinct cosines: the very order of an exact search
        assert paths == [r.path for r in full if r.path != own]
