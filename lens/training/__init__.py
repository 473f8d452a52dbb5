"""Training the methods that learn from a gallery: one loop and a registry of trainers.

    >>> from lens.training import get_trainer
    >>> trainer = get_trainer("siamese")                 # its defaults, options and train()
    >>> report = trainer.train("photos/", "models/photos/siamese", trainer.defaults, backbone="vit")

:mod:`lens.training.loop` is the one loop (data, early stopping, checkpoints, the model folder);
each trainer is a function in a module here, next to the method it trains in :mod:`lens.methods`
(``autoencoder`` -> :mod:`lens.training.autoencoder`, ``siamese`` and ``finetune`` ->
:mod:`lens.training.siamese`). :data:`TRAINERS` below says, once, each trainer's defaults and
options, so ``lens train`` and ``lens eval`` loop over it without importing torch to build a parser.

Adding a trainable method: its method module in ``lens/methods/`` (registered with
``trained=True``), its trainer module here, and one :class:`Trainer` line in :data:`TRAINERS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lens.errors import LensError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TrainSettings:
    """The parameters of one training run (each trainer has its own defaults)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    val_split: float = 0.1  #: share of the images held out to pick the best epoch and stop early
    patience: int = 3  #: epochs without a better validation loss before stopping; 0 = never stop early
    device: str | None = None  #: default: cuda when available, else cpu

    def checked(self) -> TrainSettings:
        """These settings, when they make sense (returns ``self``). Raises :class:`LensError` for fewer than 1
        epoch, a batch under 2, ``val_split`` outside [0, 1), a learning rate <= 0 or a negative ``patience``."""
        if self.epochs < 1 or self.batch_size < 2:
            raise LensError("--epochs must be at least 1 and --batch-size at least 2")
        if not 0 <= self.val_split < 1:
            raise LensError(f"--val-split must be in [0, 1), got {self.val_split}")
        if self.lr <= 0 or self.patience < 0:
            raise LensError("--lr must be positive and --patience not negative")
        return self

    def torch_device(self) -> torch.device:
        """The device to train on: ``device``, else ``cuda`` when available, else ``cpu``."""
        import torch

        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass(frozen=True)
class Option:
    """One option of a trainer: a keyword of its ``train`` function and its command-line flag."""

    name: str  #: the keyword argument, e.g. ``image_size``
    type: type
    default: Any
    help: str
    flag: str | None = None  #: default ``--`` + name with dashes, e.g. ``--image-size``
    required: bool = False
    metavar: str | None = None

    @property
    def cli_flag(self) -> str:
        """The command-line flag: ``flag``, else ``--`` + ``name`` with dashes (``--image-size``)."""
        return self.flag or "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Trainer:
    """A trainer: ``train(gallery, out, settings, *, resume, progress, workers, **options)`` writes a
    model folder (:mod:`lens.trained`) and returns a :class:`lens.training.loop.TrainReport`."""

    kind: str  #: the trained method's name, e.g. ``siamese``
    summary: str  #: one line for people
    function: str  #: ``module:function`` of the trainer, imported on first use
    defaults: TrainSettings
    options: tuple[Option, ...] = ()

    def accepts(self, name: str) -> bool:
        """Whether ``train`` takes the option ``name`` (one of :attr:`options`)."""
        return any(option.name == name for option in self.options)

    @property
    def train(self) -> Callable[..., Any]:
        """The training function (``function``, imported on first use); see the class docstring for its call."""
        module, _, function = self.function.partition(":")
        return getattr(importlib.import_module(module), function)


def _branch_options(kind: str) -> tuple[Option, ...]:
    siamese = kind == "siamese"
    return (
        Option("backbone", str, "resnet50" if siamese else None,
               "pretrained deep method: resnet50, vit, vit-in21k or hf:<id or path>"
               + (" (default: resnet50)" if siamese else ""), required=not siamese, metavar="SPEC"),
        Option("unfreeze", int, 0 if siamese else 1,
               "train the backbone's top N blocks too (default: %(default)s"
               + ("; 0 = frozen, features cached)" if siamese else ")"), metavar="N"),
        Option("labels", str, "auto", "where positive pairs come from: class sub-folders, a CSV of path,label, "
               "or none (two views of each image); default: auto", metavar="auto|folders|none|CSV"),
        Option("dim", int, 256, "projection size (default: 256)"),
        Option("views", int, 2, "cached views per image when frozen: the picture + N-1 augmented (default: 2)"),
        Option("margin", float, 0.5, "contrastive margin: other-class pairs are pushed this far apart "
               "(default: 0.5)"),
    )


#: Every trainer, by the name of the method it trains: defaults and options are written here only.
TRAINERS: dict[str, Trainer] = {trainer.kind: trainer for trainer in (
    Trainer("autoencoder", "convolutional autoencoder on the gallery's pictures; embeds with its latent",
            "lens.training.autoencoder:train", TrainSettings(epochs=20, batch_size=32, lr=1e-3, patience=3),
            (Option("image_size", int, 128, "input side in pixels (default: 128)"),
             Option("latent_dim", int, 256, "latent size (default: 256)", flag="--dim"))),
    Trainer("siamese", "Siamese network (pretrained backbone + projection head) with contrastive loss",
            "lens.training.siamese:train", TrainSettings(epochs=60, batch_size=128, lr=1e-3, patience=6),
            _branch_options("siamese")),
    Trainer("finetune", "fine-tune the top of a pretrained backbone (classification head with labels, "
            "else contrastive)", "lens.training.siamese:finetune",
            TrainSettings(epochs=5, batch_size=32, lr=1e-4, patience=2), _branch_options("finetune")),
)}


def list_trainers() -> list[str]:
    """The names of the methods that can be trained."""
    return list(TRAINERS)


def get_trainer(kind: str) -> Trainer:
    """The trainer of method ``kind``; raises :class:`LensError` for a method that is not trained."""
    if kind not in TRAINERS:
        raise LensError(f"'{kind}' cannot be trained; trainable methods: {', '.join(TRAINERS)}")
    return TRAINERS[kind]
