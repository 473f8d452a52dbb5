"""Training: tiny models trained for a few steps on generated pictures, saved, reloaded and searched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import REPO  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors import safe_open  # noqa: E402

from lens import Gallery  # noqa: E402
from lens.cli import main  # noqa: E402
from lens.errors import IndexMismatchError, LensError, ModelLoadError  # noqa: E402
from lens.methods import autoencoder as autoencoder_method  # noqa: E402
from lens.methods import create_method  # noqa: E402
from lens.methods import siamese as siamese_method  # noqa: E402
from lens.training import autoencoder, siamese  # noqa: E402
from lens.training.loop import CHECKPOINT, TrainSettings, training_data  # noqa: E402

#: three classes: a shape and a hue each, on random grey backgrounds
CLASSES = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (50, 70, 230)}
PER_CLASS = 8


def draw(kind: str, seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(90, 170, 3)))
    pen = ImageDraw.Draw(image)
    colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in CLASSES[kind])
    for _ in range(2):
        s = int(rng.integers(14, 26))
        x, y = (int(v) for v in rng.integers(0, size - s, 2))
        if kind == "circle":
            pen.ellipse((x, y, x + s, y + s), fill=colour)
        elif kind == "square":
            pen.rectangle((x, y, x + s, y + s), fill=colour)
        else:
            pen.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=colour)
    return image


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """24 pictures in 3 class sub-folders, plus one unreadable file that training must skip."""
    root = tmp_path_factory.mktemp("shapes")
    for c, kind in enumerate(CLASSES):
        (root / kind).mkdir()
        for i in range(PER_CLASS):
            draw(kind, 100 * c + i).save(root / kind / f"{kind}{i}.png")
    (root / "circle" / "broken.jpg").write_bytes(b"this is not a picture")
    return root


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    """A tiny random-initialised transformers ResNet (16-d pooled features), as an ``hf:`` spec."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    folder = tmp_path_factory.mktemp("tiny-resnet")
    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).eval().save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(folder)
    return f"hf:{folder}"


def pictures(root: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(root.glob("*/*.png"))]


def saved(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


FAST = TrainSettings(epochs=4, batch_size=8, lr=3e-3, val_split=0.25, patience=0)


# -- autoencoder -----------------------------------------------------------------------------------
def test_autoencoder_loss_decreases_and_the_saved_model_reloads_to_identical_embeddings(shapes, tmp_path):
    out = tmp_path / "ae"
    report = autoencoder.train(shapes, out, FAST, image_size=32, latent_dim=16, progress=False)

    losses = [epoch["train_loss"] for epoch in report.fit.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "manifest.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["images"] == 3 * PER_CLASS  # the unreadable file was skipped
    assert (manifest["data"]["train_images"], manifest["data"]["val_images"]) == (18, 6)
    assert manifest["parameters"]["lr"] == 3e-3 and manifest["parameters"]["latent_dim"] == 16
    assert manifest["weights"] == report.weights

    images = pictures(shapes)
    method = create_method("autoencoder", model=str(out))
    assert (method.info.dim, method.info.metric, method.info.weights) == (16, "cosine", report.weights)
    vectors = method.embed(images)
    with torch.no_grad():
        pixels = torch.stack([autoencoder_method.to_pixels(i, 32) for i in images]).float() / 255
        expected = torch.nn.functional.normalize(report.module.encoder(pixels), dim=1).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    again = autoencoder_method.AutoencoderMethod("autoencoder", out)  # a second, independent load
    np.testing.assert_array_equal(again.embed(images), vectors)


# -- siamese ---------------------------------------------------------------------------------------
def test_siamese_learns_the_classes_and_reloads_to_identical_embeddings(shapes, tiny_backbone, tmp_path):
    out = tmp_path / "siamese"
    settings = TrainSettings(epochs=12, batch_size=8, lr=3e-3, val_split=0.25, patience=0)
    report = siamese.train(shapes, out, settings, backbone=tiny_backbone, dim=8, hidden=32, progress=False)

    history = report.fit.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert report.fit.best_loss < history[0]["val_loss"]
    manifest = report.manifest
    assert manifest["data"]["labels"] == "sub-folders"
    assert manifest["data"]["classes"] == {"circle": PER_CLASS, "square": PER_CLASS, "triangle": PER_CLASS}
    assert set(saved(out)) == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}  # frozen backbone
    assert len(list((out / "cache").iterdir())) == 1  # the cached backbone features

    images = pictures(shapes)
    method = create_method("siamese", model=str(out))
    assert method.info.dim == 8 and method.info.weights == report.weights
    vectors = method.embed(images)
    backbone = create_method(tiny_backbone)
    with torch.no_grad():
        features = backbone.features(torch.stack([backbone.prepare(i) for i in images]))
        expected = report.module.embed(features).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_array_equal(siamese_method.BranchMethod("siamese", out, "siamese").embed(images), vectors)

    # trained embeddings rank same-class pictures higher than the backbone's own do
    labels = np.repeat(np.arange(3), PER_CLASS)
    assert _mean_average_precision(vectors, labels) > _mean_average_precision(backbone.embed(images), labels)


def _mean_average_precision(vectors: np.ndarray, labels: np.ndarray) -> float:
    """Each picture queries the others; relevant = same label."""
    aps = []
    for q in range(len(vectors)):
        others = np.delete(np.arange(len(vectors)), q)
        ranked = others[np.argsort(-(vectors[others] @ vectors[q]), kind="stable")]
        relevant = labels[ranked] == labels[q]
        precision = np.cumsum(relevant) / np.arange(1, len(ranked) + 1)
        aps.append(float(precision[relevant].mean()))
    return float(np.mean(aps))


def test_resumed_run_ends_with_the_same_model_as_an_uninterrupted_one(shapes, tiny_backbone, tmp_path,
                                                                      monkeypatch):
    options = {"backbone": tiny_backbone, "dim": 8, "hidden": 32, "progress": False}
    whole = siamese.train(shapes, tmp_path / "whole", FAST, **options)

    calls = {"n": 0}
    original = siamese._CachedContrastive.loss

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # 3 training batches + 1 validation batch per epoch: inside epoch 3
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(siamese._CachedContrastive, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        siamese.train(shapes, out, FAST, **options)
    assert (out / CHECKPOINT).is_file() and not (out / "model.safetensors").exists()
    monkeypatch.setattr(siamese._CachedContrastive, "loss", original)

    with pytest.raises(LensError, match="other data or parameters"):
        siamese.train(shapes, out, replace(FAST, lr=1e-2), resume=True, **options)
    resumed = siamese.train(shapes, out, FAST, resume=True, **options)
    assert resumed.fit.resumed_from == 2 and len(resumed.fit.history) == 4
    losses = [[(e["train_loss"], e["val_loss"]) for e in r.fit.history] for r in (whole, resumed)]
    assert losses[0] == losses[1]
    a, b = saved(tmp_path / "whole"), saved(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.weights == whole.weights
    assert not (out / CHECKPOINT).exists()  # a finished run leaves only the model


def test_kill_9_during_training_keeps_the_previous_model_and_the_run_resumes(shapes, tiny_backbone, tmp_path):
    out = tmp_path / "model"
    common = ["train", "siamese", str(shapes), "--backbone", tiny_backbone, "--batch-size", "8",
              "--out", str(out), "--quiet"]
    assert main([*common, "--epochs", "2"]) == 0
    before = create_method("siamese", model=str(out)).info.weights
    files = {name: (out / name).read_bytes() for name in ("model.safetensors", "config.json", "manifest.json")}

    # a second run into the same folder, far too long to finish, killed once it has checkpointed
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    run = subprocess.Popen([sys.executable, "-m", "lens", *common, "--epochs", "100000", "--patience", "0",
                            "--lr", "0.01"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not (out / CHECKPOINT).exists():
        assert run.poll() is None, run.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint after 180 s"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    assert run.wait(timeout=30) == -signal.SIGKILL

    assert {name: (out / name).read_bytes() for name in files} == files  # the previous model, intact
    assert create_method("siamese", model=str(out)).info.weights == before
    # the killed run resumes from its last checkpoint and replaces the model when it finishes (two more
    # epochs: the number of epochs is not part of what a checkpoint must match)
    with safe_open(str(out / CHECKPOINT), framework="pt") as handle:
        done = json.loads(handle.metadata()["state"])["epoch"]
    assert done >= 1
    resumed = [*common, "--epochs", str(done + 2), "--patience", "0", "--lr", "0.01", "--resume"]
    assert main(resumed) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from_epoch"] == done and len(manifest["history"]) == done + 2
    assert create_method("siamese", model=str(out)).info.weights == manifest["weights"] != before
    assert not (out / CHECKPOINT).exists()


def test_a_model_folder_mixed_from_two_runs_is_refused(shapes, tiny_backbone, tmp_path):
    options = {"backbone": tiny_backbone, "dim": 8, "hidden": 32, "progress": False}
    first = siamese.train(shapes, tmp_path / "a", FAST, **options)
    siamese.train(shapes, tmp_path / "b", replace(FAST, lr=1e-2), **options)
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")  # a half-finished save
    with pytest.raises(ModelLoadError, match="different training runs"):
        create_method("siamese", model=str(first.folder))


def test_early_stopping_keeps_the_best_epoch(shapes, tiny_backbone, tmp_path):
    settings = TrainSettings(epochs=30, batch_size=8, lr=0.5, val_split=0.25, patience=2)
    report = siamese.train(shapes, tmp_path / "m", settings, backbone=tiny_backbone, dim=8, hidden=32,
                           progress=False)
    val = [epoch["val_loss"] for epoch in report.fit.history]
    assert report.fit.stopped_early and len(val) < 30
    assert report.fit.best_epoch == int(np.argmin(val)) + 1 and report.fit.best_loss == min(val)
    assert len(val) - report.fit.best_epoch == 2


def test_finetune_trains_only_the_top_block_with_a_classifier(shapes, tiny_backbone, tmp_path):
    out = tmp_path / "finetune"
    settings = TrainSettings(epochs=4, batch_size=8, lr=3e-2, val_split=0.25, patience=0)
    report = siamese.finetune(shapes, out, settings, backbone=tiny_backbone, progress=False)

    assert report.manifest["parameters"]["objective"] == "classification"
    history = report.fit.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    names = set(saved(out))
    assert {"classifier.weight", "classifier.bias"} <= names
    assert names - {"classifier.weight", "classifier.bias"}
    assert all(n.startswith("backbone.encoder.stages.1.") for n in names if n.startswith("backbone."))

    images = pictures(shapes)
    method = create_method("finetune", model=str(out))
    backbone = create_method(tiny_backbone)
    assert method.info.dim == backbone.info.dim  # the fine-tuned backbone's pooled features
    vectors = method.embed(images)
    with torch.no_grad():
        batch = torch.stack([backbone.prepare(i) for i in images])
        expected = torch.nn.functional.normalize(report.module.features(batch), dim=1).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert not np.allclose(vectors, backbone.embed(images), atol=1e-3)  # the top block has changed


# -- where models live, and how a gallery uses them ------------------------------------------------
def test_gallery_uses_its_trained_model_and_refuses_an_index_of_an_older_one(shapes, tmp_path):
    gallery = Gallery(shapes, tmp_path / "indexes", models_dir=tmp_path / "models")
    with pytest.raises(ModelLoadError, match="lens train autoencoder"):
        gallery.index(["autoencoder"], progress=False)

    one_epoch = TrainSettings(epochs=1, batch_size=8, val_split=0.25)
    autoencoder.train(shapes, tmp_path / "models" / "autoencoder", one_epoch, image_size=32,
                      latent_dim=16, progress=False)
    gallery.index(["autoencoder"], progress=False)
    query = shapes / "square" / "square3.png"
    assert gallery.search(query, "autoencoder", k=1)[0].path == "square/square3.png"

    autoencoder.train(shapes, tmp_path / "models" / "autoencoder",
                      replace(one_epoch, seed=1), image_size=32, latent_dim=16,
                      progress=False)
    with pytest.raises(IndexMismatchError):
        gallery.search(query, "autoencoder", k=1)
    [report] = gallery.index(["autoencoder"], progress=False)
    assert report.embedded == 3 * PER_CLASS  # every image again, with the new model
    assert gallery.search(query, "autoencoder", k=1)[0].path == "square/square3.png"


def test_model_folders_are_checked_before_use(shapes, tiny_backbone, tmp_path):
    out = tmp_path / "si"
    siamese.train(shapes, out, TrainSettings(epochs=1, batch_size=8), backbone=tiny_backbone, dim=8,
                  progress=False)
    with pytest.raises(ModelLoadError, match="holds a 'siamese' model"):
        create_method("autoencoder", model=str(out))
    (out / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot read the trained model"):
        create_method(f"siamese:{out}")
    with pytest.raises(ModelLoadError, match="needs a trained model"):
        create_method("siamese")


def test_labels_come_from_folders_or_a_csv(shapes, tmp_path):
    data = training_data(shapes)
    assert data.classes == list(CLASSES) and data.label_source == "sub-folders"
    assert training_data(shapes, "none").labels is None

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        draw("circle" if i % 2 else "square", i).save(flat / f"{i}.png")
    assert training_data(flat).labels is None
    (flat / "labels.csv").write_text("path,label\n0.png,a\n1.png,b\n2.png,a\n3.png,b\n")
    data = training_data(flat)
    assert data.classes == ["a", "b"] and data.labels.tolist() == [0, 1, 0, 1]
    (flat / "labels.csv").write_text("path,label\n0.png,a\n")
    with pytest.raises(LensError, match="no label for 3 image"):
        training_data(flat)


# -- the command line ------------------------------------------------------------------------------
def test_cli_trains_then_indexes_and_searches(shapes, tiny_backbone, tmp_path, capsys):
    out, indexes = tmp_path / "model", tmp_path / "indexes"
    code = main(["train", "siamese", str(shapes), "--backbone", tiny_backbone, "--epochs", "2",
                 "--batch-size", "8", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "siamese: 2 epochs" in printed and "labels from sub-folders (3 classes)" in printed
    model = ["--model", f"siamese={out}", "--index-dir", str(indexes)]
    assert main(["index", str(shapes), "--methods", "siamese", "--quiet", *model]) == 0
    capsys.readouterr()
    query = shapes / "triangle" / "triangle2.png"
    assert main(["search", str(query), "--gallery", str(shapes), "--method", "siamese", "--json", *model]) == 0
    results = json.loads(capsys.readouterr().out)
    assert Path(results[0]["path"]) == query and results[0]["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["train", "autoencoder", "no-such-folder"], "does not exist"),
    (["train", "finetune", "{shapes}", "--backbone", "autoencoder"], "must be a deep method"),
    (["train", "siamese", "{shapes}", "--labels", "none", "--views", "1"], "--views must be at least 2"),
    (["train", "siamese", "{shapes}", "--val-split", "1.5"], "--val-split"),
])
def test_cli_training_errors_are_one_line(shapes, argv, message, capsys):
    argv = [a.format(shapes=shapes) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("lens: error:") and message in err and "Traceback" not in err


def test_every_trained_method_has_one_trainer_and_the_cli_shows_its_defaults(capsys):
    """lens train loops over the trainers' registry: one place for each trainer's defaults."""
    from lens.methods import is_trained, list_methods
    from lens.training import TRAINERS

    assert sorted(TRAINERS) == sorted(m for m in list_methods() if is_trained(m))
    for kind, trainer in TRAINERS.items():
        with pytest.raises(SystemExit):
            main(["train", kind, "--help"])
        shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert f"(default: {trainer.defaults.epochs})" in shown and f"(default: {trainer.defaults.lr:g})" in shown
        assert all(option.cli_flag in shown for option in trainer.options)
