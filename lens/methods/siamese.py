"""Siamese networks and fine-tuned backbones: a pretrained deep backbone trained for a gallery.

``siamese``: two branches that share their weights, each a pretrained backbone (any deep method:
``resnet50``, ``vit``, ``hf:<id or path>``) followed by a projection head (Linear-ReLU-Linear,
L2-normalised), trained with the contrastive loss of Hadsell, Chopra & LeCun (2006) on every pair of
a batch: same-class pairs are pulled together, other pairs pushed beyond a margin. Positive pairs
come from labels (a gallery of class sub-folders, or a ``labels.csv`` of ``path,label``) or, without
labels, from two random views (crop, mirror, colour) of the same image (self-supervised). With the
backbone frozen (the default) its pooled features are computed once, for the plain picture and
``views - 1`` random views of it, and cached, so only the head is trained: minutes on a CPU.
``--unfreeze N`` trains the top N blocks of the backbone too (every step then runs the backbone).

``finetune``: the top of the backbone (``--unfreeze``, default its last block) is trained with a
classification head when the gallery has labels (cross-entropy) and with the contrastive objective
above when it has none. The ``finetune`` method embeds with the fine-tuned backbone's pooled features
(classification) or its projection head (contrastive).

Both embed with the trained branch, L2-normalised (cosine). A model folder stores the trained
tensors only (head, classifier, unfrozen blocks); the backbone is loaded from its own weights,
which must still be the ones it was trained on. The methods load ``models/<gallery>/<kind>`` for a
gallery, or any folder: ``--model siamese=PATH`` or the spec ``siamese:PATH`` (same for finetune).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
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
from torch import nn

from lens.embedding import embed_files
from lens.errors import LensError, ModelLoadError
from lens.images import load_image
from lens.methods import create_method, is_trained, register_method
from lens.types import BaseMethod, MethodInfo, l2_normalise
from lens.methods.deep import HFBackbone
from lens.training.loop import (
    TrainingData,
    TrainReport,
    TrainSettings,
    augment,
    content_rng,
    load_all,
    load_trainable,
    train_and_save,
    training_data,
)
from lens.trained import fingerprint, load_model, model_folder, save_tensors

log = logging.getLogger("lens")

SIAMESE_DEFAULTS = TrainSettings(epochs=60, batch_size=128, lr=1e-3, patience=6)
FINETUNE_DEFAULTS = TrainSettings(epochs=5, batch_size=32, lr=1e-4, patience=2)


# -- the network -----------------------------------------------------------------------------------
class BranchNet(nn.Module):
    """One branch: backbone (shared and frozen, or a copy with its top trainable), then a head.

    ``head`` (projection, contrastive objective) and ``classifier`` (classification objective) are
    the trained parts; ``backbone`` is a trainable copy of the backbone only when its top is unfrozen.
    """

    def __init__(self, source: HFBackbone, backbone: nn.Module | None, head: nn.Module | None,
                 classifier: nn.Module | None):
        super().__init__()
        self.source = source  # the loaded backbone method: its processor, pooling and frozen weights
        self.backbone = backbone
        self.head = head
        self.classifier = classifier

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (the fine-tuned copy's when there is one)."""
        if self.backbone is None:
            return self.source.features(pixel_values)
        return self.source.pool(self.backbone(pixel_values=pixel_values.to(self.source.device))).float()

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The branch's unit-length output for pooled features."""
        if self.head is not None:
            features = self.head(F.normalize(features, dim=1))
        return F.normalize(features, dim=1)

    def train(self, mode: bool = True) -> BranchNet:
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()  # pretrained batch-norm statistics and dropout stay as they are
        return self


def load_backbone(spec: str, model: str | None = None, device: str | None = None) -> HFBackbone:
    options = {"device": device} if device else {}
    method = None if is_trained(spec.partition(":")[0]) else create_method(spec, model=model, **options)
    if not isinstance(method, HFBackbone):
        raise LensError(f"the backbone must be a deep method (resnet50, vit, vit-in21k, hf:<id or path>), "
                        f"not '{spec}'")
    return method


def block_stack(model: nn.Module) -> nn.Module:
    """The backbone's main sequence of blocks: the ModuleList/Sequential holding the most parameters
    (ResNet stages, ViT/DINOv2 layers, timm EfficientNet stages)."""
    stacks = [m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2]
    if not stacks:
        raise LensError(f"cannot find the blocks of {type(model).__name__} to unfreeze")
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))


def unfreeze_top(model: nn.Module, blocks: int) -> list[str]:
    """Freeze ``model`` except its last ``blocks`` blocks and every layer after them; returns the
    names of the trainable parameters."""
    stack = block_stack(model)
    top = {id(p) for block in list(stack)[-blocks:] for p in block.parameters()}
    in_stack = {id(p) for p in stack.parameters()}
    named = list(model.named_parameters())
    last = max(i for i, (_, p) in enumerate(named) if id(p) in in_stack)
    for i, (_, p) in enumerate(named):
        p.requires_grad_(id(p) in top or i > last)
    return [name for name, p in named if p.requires_grad]


def build_net(config: dict[str, Any], source: HFBackbone) -> BranchNet:
    backbone = None
    if config["unfreeze"]:
        backbone = copy.deepcopy(source.model)
        unfreeze_top(backbone, config["unfreeze"])
    width = config["backbone_dim"]
    head = classifier = None
    if config["objective"] == "contrastive":
        head = nn.Sequential(nn.Linear(width, config["hidden"]), nn.ReLU(inplace=True),
                             nn.Linear(config["hidden"], config["dim"]))
    else:
        classifier = nn.Linear(width, len(config["classes"]))
    return BranchNet(source, backbone, head, classifier).to(source.device)


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


# -- the methods -----------------------------------------------------------------------------------
class BranchMethod(BaseMethod):
    """Embeds with a trained branch (``siamese`` or ``finetune`` model folder)."""

    def __init__(self, name: str, folder: str | Path, kind: str, device: str | None = None):
        tensors, config = load_model(folder, kind)
        try:
            source = load_backbone(config["backbone"], config.get("backbone_model"), device)
        except LensError as exc:
            raise ModelLoadError(f"cannot load the backbone of the {kind} model in '{folder}': {exc}") from exc
        if source.info.weights != config["backbone_weights"]:
            raise ModelLoadError(
                f"the {kind} model in '{folder}' was trained on backbone '{config['backbone']}' with weights "
                f"{config['backbone_weights']}, but that backbone now has weights {source.info.weights}; "
                f"train it again with `lens train {kind} GALLERY --backbone {config['backbone']}`"
            )
        self.source = source
        self.decode_size = source.decode_size
        self.net = build_net(config, source)
        try:
            load_trainable(self.net, tensors)
        except LensError as exc:
            raise ModelLoadError(f"the {kind} model in '{folder}' does not fit its config.json: {exc}") from exc
        self.net.eval()
        self._lock = threading.Lock()
        dim = config["dim"] if config["objective"] == "contrastive" else config["backbone_dim"]
        self.info = MethodInfo(
            name=name, metric="cosine", dim=int(dim), model=str(folder), weights=fingerprint(tensors, config),
            extra={"backbone": config["backbone"], "objective": config["objective"],
                   "unfreeze": config["unfreeze"], "architecture": source.info.extra.get("architecture")},
        )

    def prepare(self, image: Image.Image) -> torch.Tensor:
        return self.source.prepare(image)

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        batch = torch.stack(list(items))
        with self._lock, torch.inference_mode():
            return l2_normalise(self.net.embed(self.net.features(batch)).cpu().numpy())


def _factory_for(kind: str):
    def factory(spec: str, model: str | None = None, **options: Any) -> BranchMethod:
        return BranchMethod(spec, model_folder(kind, spec, model), kind, **options)

    return factory


for _kind in ("siamese", "finetune"):
    register_method(_kind, trained=True)(_factory_for(_kind))
    register_method(_kind, prefix=True)(_factory_for(_kind))


# -- training --------------------------------------------------------------------------------------
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
) -> TrainReport:
    """Train a ``siamese`` or ``finetune`` model on ``gallery`` and write it to the folder ``out``.

    ``objective``: ``contrastive``, ``classification`` (needs labels) or ``auto`` (classification
    when the gallery has labels).
    """
    started = time.perf_counter()
    settings, out = settings.checked(), Path(out)
    if unfreeze < 0 or views < 1 or dim < 1 or hidden < 1 or margin <= 0:
        raise LensError("--unfreeze must be >= 0, --views/--dim/--hidden >= 1 and --margin > 0")
    data = training_data(gallery, labels)
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
