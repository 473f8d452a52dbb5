"""`lens eval` on generated datasets, in both layouts, through the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_picture
from test_cli import lens

from lens.evaluation.datasets import load_dataset


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


def test_eval_with_class_folders_and_top(tmp_path, tiny_resnet):
    _class_folders(tmp_path / "shapes")
    done = lens("eval", "shapes", "--methods", "resnet50", "--model", f"resnet50={tiny_resnet}", "--top", "3",
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "eval" / "shapes" / "results.json").read_text())
    [method] = results["methods"]
    assert 0.0 <= method["map"] <= 1.0 and method["queries_scored"] == 6
    assert results["config"]["top"] == 3


def test_eval_trains_trainable_methods_on_the_training_split_only(tmp_path):
    _class_folders(tmp_path / "shapes")
    done = lens("eval", "shapes", "--methods", "autoencoder", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "eval" / "shapes" / "results.json").read_text())
    [method] = results["methods"]
    assert method["error"] is None and 0.0 <= method["map"] <= 1.0
    assert f"trained on 12 images of {(tmp_path / 'shapes' / 'train').resolve()}" in method["data_seen"]
    manifest = json.loads((tmp_path / "eval" / "shapes" / "models" / "autoencoder" / "manifest.json").read_text())
    assert manifest["data"]["images"] == 12  # the 6 test images were never seen
    assert "trained on 12 images" in (tmp_path / "eval" / "shapes" / "report.md").read_text()
