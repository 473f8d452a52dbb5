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
which must still be the ones it was trained on. The methods load ``models/<gallery>-<hash>/<kind>`` for a
gallery, or any folder: ``--model siamese=PATH`` or the spec ``siamese:PATH`` (same for finetune).
Training is :mod:`lens.training.siamese`.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lens.errors import LensError, ModelLoadError
from lens.methods import create_method, is_trained, register_method
from lens.types import BaseMethod, MethodInfo, l2_normalise
from lens.methods.deep import HFBackbone
from lens.trained import fingerprint, load_model, load_trainable, model_folder



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
        """``nn.Module.train``, except that a trainable backbone copy stays in eval mode (its pretrained
        batch-norm statistics and dropout are kept); returns the net."""
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()  # pretrained batch-norm statistics and dropout stay as they are
        return self


def load_backbone(spec: str, model: str | None = None, device: str | None = None) -> HFBackbone:
    """The deep method ``spec`` (``resnet50``, ``vit``, ``hf:<id or path>``; ``model`` overrides its weights)
    that a siamese or finetune branch is built on. Raises :class:`LensError` for any other method
    (a hash, SIFT, a trained method) and :class:`ModelLoadError` when its weights cannot load."""
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
    """A freshly initialised :class:`BranchNet` for a model ``config`` (as ``config.json`` stores it:
    ``objective`` contrastive -> a ``backbone_dim`` -> ``hidden`` -> ``dim`` projection head; else a linear
    classifier over ``classes``; ``unfreeze`` > 0 -> a trainable copy of the backbone with its top
    ``unfreeze`` blocks unfrozen), on the backbone's device."""
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
        """The backbone's own preprocessing (:meth:`lens.methods.deep.HFBackbone.prepare`): ``(3, H, W)`` float32."""
        return self.source.prepare(image)

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        """The trained branch's output for prepared pixels: ``(n, info.dim)`` float32, L2-normalised (``dim`` for a
        contrastive head, ``backbone_dim`` for a classification-finetuned backbone)."""
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
