"""Training the ``siamese`` and ``finetune`` methods (:mod:`lens.methods.siamese`).

The contrastive loss of Hadsell, Chopra & LeCun (2006) over every pair of a batch; with a frozen
backbone, its features are computed once per view and cached (only the head trains); with
``unfreeze`` N > 0, the top N blocks train too, on decoded and augmented pictures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from lens.embedding import embed_files
from lens.errors import LensError
from lens.images import load_image
from lens.methods.deep import HFBackbone
from lens.methods.siamese import BranchNet, build_net, load_backbone
from lens.trained import save_tensors
from lens.training import TrainSettings, get_trainer
from lens.training.loop import (
    TrainingData,
    TrainReport,
    augment,
    content_rng,
    load_all,
    train_and_save,
    training_data,
)
from lens.types import BaseMethod

log = logging.getLogger("lens")

SIAMESE_DEFAULTS = get_trainer("siamese").defaults  #: see lens.training.TRAINERS
FINETUNE_DEFAULTS = get_trainer("finetune").defaults


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, same: torch.Tensor, margin: float) -> torch.Tensor:
    """Contrastive loss over every pair (i, j) of two batches of unit vectors: ``d²`` for pairs with
    ``same[i, j]``, ``max(0, margin - d)²`` for the others, each half averaged on its own so the few
    positive pairs weigh as much as the many negatives."""
    d2 = (2 - 2 * z1 @ z2.T).clamp_min(0)
    positive = d2[same].mean()
    if not (~same).any():
        return positive
    negative = F.relu(margin - d2[~same].clamp_min(1e-12).sqrt()).pow(2).mean()
    return (positive + negative) / 2


# -- cached backbone features --------------------------------------------------------------------------------------
class _FeatureViews(BaseMethod):
    """Un-normalised backbone features of one view of each picture (0 = the picture as it is)."""

    def __init__(self, source: HFBackbone, view: int, seed: int):
        self.source, self.view, self.seed = source, view, seed
        self.info = source.info

    def prepare(self, image: Image.Image) -> torch.Tensor:
        if self.view:
            image = augment(image, content_rng(image, self.seed, self.view))
        return self.source.prepare(image)

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        return self.source.features(torch.stack(list(items))).cpu().numpy()


def cached_features(source: HFBackbone, data: TrainingData, views: int, seed: int, cache_dir: Path,
                    *, batch_size: int = 32, workers: int = 2, progress: bool = True) -> np.ndarray:
    """Backbone features (images x views x dim) of the training images, from the cache when there.

    Unreadable images are dropped from ``data``.
    """
    key = json.dumps([source.info.weights, data.fingerprint, views, seed])
    path = cache_dir / f"features-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="np") as handle:
                rows = json.loads((handle.metadata() or {})["rows"])
                features = handle.get_tensor("features")
            data.keep(rows)
            return features
        except Exception as exc:  # a damaged cache is recomputed
            log.warning("feature cache %s unreadable (%s); computing it again", path, exc)
    files = data.files()
    per_view, rows = [], list(range(len(files)))
    for view in range(views):
        done = embed_files(_FeatureViews(source, view, seed), [files[r] for r in rows], batch_size=batch_size,
                           workers=workers, progress=progress, desc=f"backbone features, view {view + 1}/{views}")
        if view == 0:
            readable = {str(p) for p in done.paths}
            rows = [r for r in rows if str(files[r]) in readable]
        per_view.append(done.vectors)
    features = np.stack(per_view, axis=1).astype(np.float32)
    save_tensors(path, {"features": torch.from_numpy(features)}, metadata={"rows": json.dumps(rows)})
    data.keep(rows)
    return features


class _CachedContrastive:
    """Contrastive objective on cached features: branch A sees one view, branch B another."""

    def __init__(self, net: BranchNet, features: np.ndarray, labels: np.ndarray | None, margin: float):
        self.module, self.margin = net, margin
        device = net.source.device
        self.features = torch.from_numpy(features).to(device)
        self.labels = torch.from_numpy(labels).to(device) if labels is not None else None

    def loss(self, batch: np.ndarray, rng: np.random.Generator, train: bool) -> torch.Tensor:
        count, views = len(batch), self.features.shape[1]
        a = rng.integers(views, size=count)
        if self.labels is None:  # self-supervised: two different views of each image
            b = (a + rng.integers(1, views, size=count)) % views
        else:
            b = rng.integers(views, size=count)
        rows = torch.from_numpy(batch)
        z1 = self.module.embed(self.features[rows, torch.from_numpy(a)])
        z2 = self.module.embed(self.features[rows, torch.from_numpy(b)])
        return contrastive_loss(z1, z2, _same(self.labels, rows, z1.device), self.margin)


def _same(labels: torch.Tensor | None, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    if labels is None:
        return torch.eye(len(rows), dtype=torch.bool, device=device)
    picked = labels[rows.to(labels.device)]
    return picked[:, None] == picked[None, :]


class _ImageObjective:
    """Objectives that run the (partly trainable) backbone on decoded, augmented pictures."""

    def __init__(self, net: BranchNet, files: list[Path], labels: np.ndarray | None, margin: float,
                 pool: ThreadPoolExecutor):
        self.module, self.files, self.margin, self.pool = net, files, margin, pool
        self.labels = torch.from_numpy(labels) if labels is not None else None

    def _pixels(self, batch: np.ndarray, rng: np.random.Generator, augmented: bool) -> torch.Tensor:
        seeds = rng.integers(2**31, size=len(batch))

        def one(row: int, seed: int) -> torch.Tensor:
            image = load_image(self.files[row])
            if augmented:
                image = augment(image, np.random.default_rng(seed))
            return self.module.source.prepare(image)

        return torch.stack(list(self.pool.map(one, batch.tolist(), seeds.tolist())))

    def loss(self, batch: np.ndarray, rng: np.random.Generator, train: bool) -> torch.Tensor:
        net = self.module
        if net.classifier is not None:
            assert self.labels is not None
            logits = net.classifier(net.features(self._pixels(batch, rng, augmented=train)))
            return F.cross_entropy(logits, self.labels[torch.from_numpy(batch)].to(logits.device))
        z1 = net.embed(net.features(self._pixels(batch, rng, augmented=train)))
        z2 = net.embed(net.features(self._pixels(batch, rng, augmented=True)))
        return contrastive_loss(z1, z2, _same(self.labels, torch.from_numpy(batch), z1.device), self.margin)


def _local_or_none(spec: str) -> str | None:
    """The absolute path of a backbone given as a local folder (so the model loads from any directory)."""
    argument = spec.partition(":")[2]
    return os.path.abspath(os.path.expanduser(argument)) if argument and os.path.exists(
        os.path.expanduser(argument)) else None


def train_branch(
    kind: str,
    gallery: str | Path,
    out: str | Path,
    settings: TrainSettings,
    *,
    backbone: str = "resnet50",
    unfreeze: int = 0,
    objective: str = "contrastive",
    labels: str = "auto",
    views: int = 2,
    dim: int = 256,
    hidden: int = 512,
    margin: float = 0.5,
    resume: bool = False,
    progress: bool = True,
    workers: int = 2,
    only: Sequence[str] | None = None,
) -> TrainReport:
    """Train a ``siamese`` or ``finetune`` model on ``gallery`` and write it to the folder ``out``.

    ``objective``: ``contrastive``, ``classification`` (needs labels) or ``auto`` (classification
    when the gallery has labels). ``only``: train on these images of ``gallery`` (paths relative to
    it) instead of all of them.
    """
    started = time.perf_counter()
    settings, out = settings.checked(), Path(out)
    if unfreeze < 0 or views < 1 or dim < 1 or hidden < 1 or margin <= 0:
        raise LensError("--unfreeze must be >= 0, --views/--dim/--hidden >= 1 and --margin > 0")
    data = training_data(gallery, labels, only=only)
    if objective == "auto":
        objective = "classification" if data.labels is not None else "contrastive"
    if objective == "classification" and data.labels is None:
        raise LensError(f"a classification head needs labels: class sub-folders or a labels.csv in '{gallery}'")
    if objective == "contrastive" and data.labels is None and not unfreeze and views < 2:
        raise LensError("without labels, positive pairs are two views of an image: --views must be at least 2")
    source = load_backbone(backbone, _local_or_none(backbone), settings.device)
    width = source.info.dim
    config = {"kind": kind, "backbone": backbone, "backbone_model": _local_or_none(backbone),
              "backbone_weights": source.info.weights, "backbone_dim": width, "unfreeze": unfreeze,
              "objective": objective, "dim": dim if objective == "contrastive" else width,
              "hidden": hidden, "margin": margin, "classes": data.classes}
    options = {"backbone": backbone, "unfreeze": unfreeze, "objective": objective, "labels": labels,
               "views": views, "dim": dim, "hidden": hidden, "margin": margin}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        if unfreeze:
            _, rows = load_all(data.files(), lambda image: True, workers=workers, progress=progress,
                               desc="checking images")
            data.keep(rows)
        else:
            features = cached_features(source, data, views, settings.seed, out / "cache",
                                       workers=workers, progress=progress)
        if len(data.paths) < 2:
            raise LensError(f"need at least 2 readable images in '{gallery}' to train, found {len(data.paths)}")
        torch.manual_seed(settings.seed)
        net = build_net(config, source)
        task = (_ImageObjective(net, data.files(), data.labels, margin, pool) if unfreeze
                else _CachedContrastive(net, features, data.labels, margin))
        return train_and_save(kind, out, task, data, config, settings, resume=resume, progress=progress,
                              started=started, options=options)


def train(gallery: str | Path, out: str | Path, settings: TrainSettings = SIAMESE_DEFAULTS,
          **options: Any) -> TrainReport:
    """Train a Siamese network (contrastive loss; frozen backbone unless ``unfreeze``)."""
    return train_branch("siamese", gallery, out, settings, **options)


def finetune(gallery: str | Path, out: str | Path, settings: TrainSettings = FINETUNE_DEFAULTS,
             **options: Any) -> TrainReport:
    """Fine-tune the top of a backbone: classification head with labels, else contrastive."""
    options = {"unfreeze": 1, "objective": "auto", **options}
    return train_branch("finetune", gallery, out, settings, **options)
