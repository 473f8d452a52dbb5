"""The training loop shared by every trainable method, and the training data it reads.

:func:`fit` trains an :class:`Objective` (a module and a loss over a batch of example numbers):

- seeded: the shuffling and every random choice of epoch ``e`` come from ``(seed, e)``, so a run
  resumed from its checkpoint ends with the same weights as one that was never interrupted;
- a progress bar per epoch shows the running loss, then the validation loss;
- a validation split (``val_split``) drives early stopping (``patience`` epochs without a better
  validation loss) and picks the weights that are kept (those of the best epoch);
- after every epoch a checkpoint (trained tensors, optimiser state, best weights, history) is written
  atomically to one safetensors file; ``resume=True`` continues from it;
- CPU by default, the GPU when one is present.

Only parameters with ``requires_grad`` are trained, saved and restored: frozen parts of a network
(a pretrained backbone) are rebuilt from their own weights and never copied into checkpoints.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from lens.errors import LensError
from lens.training import TrainSettings
from lens.trained import load_trainable, save_model, save_tensors, trainable_state

log = logging.getLogger("lens")

CHECKPOINT = "checkpoint.safetensors"


# -- training data ---------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """The images of a gallery to train on, with class labels when the gallery has them."""

    root: Path
    paths: list[str]  #: relative to ``root``
    labels: np.ndarray | None  #: class number per image, or None (self-supervised)
    classes: list[str]  #: class names, by number
    label_source: str  #: "sub-folders", "csv:<file>" or "none"
    fingerprint: str = ""  #: changes when any file, size, time or label changes

    def files(self) -> list[Path]:
        """The training images' files: ``root / path`` for each of ``paths``."""
        return [self.root / p for p in self.paths]

    def keep(self, rows: list[int]) -> None:
        """Restrict to ``rows`` (e.g. the images that could be read)."""
        self.paths = [self.paths[r] for r in rows]
        if self.labels is not None:
            self.labels = self.labels[rows]

    def describe(self) -> dict[str, Any]:
        """What a model's manifest records about its data: the resolved gallery, the number of images, where the
        labels came from, images per class, and the data fingerprint."""
        counts = Counter(self.labels.tolist()) if self.labels is not None else {}
        return {
            "gallery": str(self.root.resolve()),
            "images": len(self.paths),
            "labels": self.label_source,
            "classes": {name: counts.get(i, 0) for i, name in enumerate(self.classes)},
            "data_fingerprint": self.fingerprint,
        }


def training_data(root: str | Path, labels: str = "auto", only: Sequence[str] | None = None) -> TrainingData:
    """The images below ``root`` (or only those of ``only``, paths relative to ``root``) and their labels.

    ``labels``: ``auto`` (sub-folder names when every image is in a sub-folder and there are at
    least two, else a ``labels.csv`` in the gallery, else none), ``folders``, ``none``, or the path of
    a CSV file with columns ``path,label`` (paths relative to the gallery).
    ``only`` (e.g. a dataset's gallery list, which leaves its query photos out): a listed image that is
    not below ``root`` is a LensError.
    """
    from lens.indexing import scan

    if not Path(root).is_dir():
        raise LensError(f"gallery folder '{root}' does not exist or is not a folder")
    # the folder a Gallery keeps its indexes in by default (indexes/<name>, from here) is not trained on
    items = scan(Path(root), exclude=(Path("indexes") / Path(root).resolve().name,))
    if only is not None:
        listed = set(only)
        missing = sorted(listed - {item.path for item in items})
        if missing:
            raise LensError(f"{len(missing)} training image(s) are not in '{root}', e.g. '{missing[0]}'")
        items = [item for item in items if item.path in listed]
    if not items:
        raise LensError(f"no images found in '{root}' to train on")
    root = Path(root)
    paths = [item.path for item in items]
    folders = [p.split("/")[0] if "/" in p else None for p in paths]
    if labels == "auto":
        if None not in folders and len(set(folders)) >= 2:
            labels = "folders"
        else:
            labels = str(root / "labels.csv") if (root / "labels.csv").is_file() else "none"
    names: list[str] | None = None
    source = "none"
    if labels == "folders":
        if None in folders:
            raise LensError(f"--labels folders: some images lie directly in '{root}', not in a class folder")
        names, source = [str(f) for f in folders], "sub-folders"
    elif labels != "none":
        by_path = _read_labels_csv(Path(labels))
        missing = [p for p in paths if p not in by_path]
        if missing:
            raise LensError(f"{labels} has no label for {len(missing)} image(s), e.g. '{missing[0]}'")
        names, source = [by_path[p] for p in paths], f"csv:{labels}"
    classes = sorted(set(names)) if names else []
    number = {name: i for i, name in enumerate(classes)}
    numbers = np.array([number[n] for n in names], dtype=np.int64) if names else None
    # a file rewritten in place with its size and mtime kept still changes ctime (see lens.store.Item)
    digest = hashlib.sha256(json.dumps([[i.path, i.size, i.mtime_ns, i.ctime_ns, i.inode] for i in items]).encode())
    digest.update(json.dumps(names).encode())
    return TrainingData(root, paths, numbers, classes, source, "sha256:" + digest.hexdigest()[:16])


def _read_labels_csv(path: Path) -> dict[str, str]:
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise LensError(f"cannot read labels file '{path}': {exc}") from exc
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise LensError(f"labels file '{path}' needs a header with the columns path,label")
    return {row["path"].strip().replace("\\", "/"): row["label"].strip() for row in rows}


def split(count: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Example numbers for training and for validation (a seeded random share ``val_split``)."""
    order = np.random.default_rng([seed, 1]).permutation(count)
    val_count = int(round(count * val_split)) if count * val_split >= 1 else 0
    val_count = min(val_count, count - 2)
    return np.sort(order[val_count:]), np.sort(order[:val_count])


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random view of ``image``: resized crop (50-100% of the area), mirror, brightness/contrast/colour."""
    width, height = image.size
    area = width * height * rng.uniform(0.5, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(width, max(1, round(math.sqrt(area * ratio))))
    h = min(height, max(1, round(math.sqrt(area / ratio))))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    image = TF.crop(image, top, left, h, w)
    if rng.random() < 0.5:
        image = TF.horizontal_flip(image)
    image = TF.adjust_brightness(image, rng.uniform(0.7, 1.3))
    image = TF.adjust_contrast(image, rng.uniform(0.7, 1.3))
    return TF.adjust_saturation(image, rng.uniform(0.7, 1.3))


def load_all(
    paths: Sequence[Path], convert: Callable[[Image.Image], Any], *, workers: int = 2,
    progress: bool = True, desc: str = "loading",
) -> tuple[list[Any], list[int]]:
    """``convert(load_image(path))`` for every path (in threads), and the rows that could be read."""
    from lens.images import load_image

    def one(path: Path) -> Any:
        try:
            return convert(load_image(path))
        except Exception as exc:  # one bad file must never stop a training run
            log.warning("skipped %s: %s", path, exc)
            return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(one, paths), total=len(paths), desc=desc, unit="img",
                            disable=not progress, dynamic_ncols=True))
    rows = [row for row, result in enumerate(results) if result is not None]
    return [results[row] for row in rows], rows


def content_rng(image: Image.Image, *key: int) -> np.random.Generator:
    """A generator seeded by ``key`` and the picture's pixels: the same view of an image in any thread."""
    return np.random.default_rng([*key, zlib.crc32(image.tobytes())])


# -- the loop --------------------------------------------------------------------------------------
class Objective(Protocol):
    """What :func:`fit` trains: a module, and a loss over a batch of example numbers."""

    module: torch.nn.Module  #: holds every parameter being trained (``requires_grad=True``)

    def loss(self, batch: np.ndarray, rng: np.random.Generator, train: bool) -> torch.Tensor:
        """The mean loss (a 0-d float tensor) over ``batch`` ((b,) int64 example numbers); ``rng`` draws any
        random views; ``train`` False: validation (deterministic, no augmentation)."""


@dataclass
class FitResult:
    """What :func:`fit` did: the loss per epoch, the best epoch (whose weights the module now holds) and its
    validation loss, whether patience ended the run, and its wall time in seconds.
    """

    history: list[dict[str, float]]  #: per epoch: epoch, train_loss, val_loss, seconds
    best_epoch: int
    best_loss: float
    stopped_early: bool
    resumed_from: int  #: epochs already done when this run started (0 = fresh)
    seconds: float  #: wall time of this run's epochs


@dataclass
class _State:
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False


def fit(
    objective: Objective,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    settings: TrainSettings,
    checkpoint: Path,
    *,
    run_key: dict[str, Any],
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Train ``objective.module`` in place; on return it holds the weights of the best epoch.

    ``run_key`` describes the run (data, model, parameters but the number of epochs); a checkpoint
    is only resumed by a run with the same key.
    """
    module = objective.module
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise LensError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    key = json.dumps(run_key, sort_keys=True, default=str)
    state, best = _State(), trainable_state(module)
    if resume and checkpoint.is_file():
        state, best = _load_checkpoint(checkpoint, module, optimizer, key)
        log.info("resuming %s after epoch %d", desc, state.epoch)
    elif resume:
        log.warning("no checkpoint in %s to resume; training from the start", checkpoint.parent)
    resumed_from, started = state.epoch, time.perf_counter()
    torch.set_flush_denormal(True)  # tiny gradients otherwise slow CPU arithmetic down 10-20 times
    val_rng_seed = [settings.seed, 2]
    while state.epoch < settings.epochs and not state.stopped_early:
        epoch = state.epoch
        epoch_started = time.perf_counter()
        torch.manual_seed(settings.seed * 100_003 + epoch)
        rng = np.random.default_rng([settings.seed, 3, epoch])
        order = rng.permutation(train_ids)
        batches = _batches(order, settings.batch_size)
        module.train()
        total = 0.0
        bar = tqdm(total=len(batches), desc=f"{desc} {epoch + 1}/{settings.epochs}", unit="batch",
                   disable=not progress, dynamic_ncols=True)
        for step, batch in enumerate(batches):
            loss = objective.loss(batch, rng, True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            bar.set_postfix(loss=f"{total / (step + 1):.4f}", refresh=False)
            bar.update()
        train_loss = total / max(1, len(batches))
        val_loss = _evaluate(objective, val_ids, settings.batch_size, val_rng_seed)
        bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_loss:.4f}" if val_loss is not None else "-")
        bar.close()
        watched = val_loss if val_loss is not None else train_loss
        state.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                              "seconds": round(time.perf_counter() - epoch_started, 2)})
        state.epoch = epoch + 1
        if watched < state.best_loss:
            state.best_loss, state.best_epoch, state.bad_epochs = watched, epoch + 1, 0
            best = trainable_state(module)
        else:
            state.bad_epochs += 1
            state.stopped_early = settings.patience > 0 and state.bad_epochs >= settings.patience
        _save_checkpoint(checkpoint, module, optimizer, best, state, key)
    load_trainable(module, best)
    module.eval()
    return FitResult(state.history, state.best_epoch, state.best_loss, state.stopped_early,
                     resumed_from, time.perf_counter() - started)


def _batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of ``batch_size``; a last batch of one example joins the one before (pair losses need two)."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2] = np.concatenate(batches[-2:])
        batches.pop()
    return batches


def _evaluate(objective: Objective, val_ids: np.ndarray, batch_size: int, seed: list[int]) -> float | None:
    if len(val_ids) < 2:
        return None
    objective.module.eval()
    rng = np.random.default_rng(seed)  # the same validation pairs and views every epoch
    batches = _batches(val_ids, batch_size)
    with torch.no_grad():
        losses = [float(objective.loss(batch, rng, False)) * len(batch) for batch in batches]
    return sum(losses) / len(val_ids)


# -- checkpoints -----------------------------------------------------------------------------------
def _save_checkpoint(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     best: dict[str, torch.Tensor], state: _State, key: str) -> None:
    tensors = {f"model/{k}": v for k, v in trainable_state(module).items()}
    tensors.update({f"best/{k}": v for k, v in best.items()})
    optim = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for index, entries in optim["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{name}"] = value
            else:
                scalars[f"{index}/{name}"] = value
    meta = {"run": key, "state": json.dumps(asdict(state)),
            "optim": json.dumps({"param_groups": optim["param_groups"], "scalars": scalars})}
    save_tensors(path, tensors, metadata=meta)


def _load_checkpoint(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     key: str) -> tuple[_State, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        state = _State(**json.loads(meta["state"]))
        optim = json.loads(meta["optim"])
    except Exception as exc:  # a damaged file: safetensors, json or key errors
        raise LensError(f"cannot read checkpoint {path} ({exc}); train again without --resume") from exc
    if meta.get("run") != key:
        raise LensError(
            f"the checkpoint in {path.parent} is from a run with other data or parameters; "
            "train again without --resume (or with the parameters of that run)"
        )
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "best": {}}
    optim_state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        part, _, rest = name.partition("/")
        if part == "optim":
            index, _, entry = rest.partition("/")
            optim_state.setdefault(int(index), {})[entry] = tensor
        else:
            groups[part][rest] = tensor
    for name, value in optim["scalars"].items():
        index, _, entry = name.partition("/")
        optim_state.setdefault(int(index), {})[entry] = value
    load_trainable(module, groups["model"])
    optimizer.load_state_dict({"state": optim_state, "param_groups": optim["param_groups"]})
    return state, groups["best"]


# -- a finished run --------------------------------------------------------------------------------
@dataclass
class TrainReport:
    """What one ``lens train`` run produced."""

    kind: str
    folder: Path  #: the model folder
    weights: str  #: the weights fingerprint indexes are checked against
    fit: FitResult
    seconds: float  #: the whole run: reading images, caching features and training
    module: torch.nn.Module  #: the trained network (the best epoch's weights)
    manifest: dict[str, Any]


def run_key(kind: str, data: TrainingData, config: dict[str, Any], settings: TrainSettings,
            **options: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the data, the network and the parameters."""
    fixed = {k: v for k, v in asdict(settings).items() if k not in ("epochs", "patience", "device")}
    return {"kind": kind, "data": data.fingerprint, "config": config, "settings": fixed, **options}


def train_and_save(
    kind: str,
    out: Path,
    objective: Objective,
    data: TrainingData,
    config: dict[str, Any],
    settings: TrainSettings,
    *,
    options: dict[str, Any],
    started: float,
    resume: bool = False,
    progress: bool = True,
) -> TrainReport:
    """Split ``data``, :func:`fit` the objective (checkpointing into ``out``) and save the model there."""
    train_ids, val_ids = split(len(data.paths), settings.val_split, settings.seed)
    result = fit(objective, train_ids, val_ids, settings, out / CHECKPOINT,
                 run_key=run_key(kind, data, config, settings, **options), resume=resume, progress=progress,
                 desc=kind)
    return save_trained(kind, out, objective.module, config, data, (len(train_ids), len(val_ids)), settings,
                        result, started, options)


def save_trained(
    kind: str,
    folder: Path,
    module: torch.nn.Module,
    config: dict[str, Any],
    data: TrainingData,
    split_sizes: tuple[int, int],
    settings: TrainSettings,
    result: FitResult,
    started: float,
    options: dict[str, Any],
) -> TrainReport:
    """Write the trained model folder with its manifest, and drop the finished run's checkpoint."""
    from lens.version import __version__

    seconds = time.perf_counter() - started
    manifest = {
        "kind": kind,
        "data": {**data.describe(), "train_images": split_sizes[0], "val_images": split_sizes[1]},
        "parameters": {**asdict(settings), **options},
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_loss": result.best_loss,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from,
        "seconds": {"total": round(seconds, 1), "epochs": round(result.seconds, 1)},
        "device": str(settings.torch_device()),
        "torch_threads": torch.get_num_threads(),
        "versions": {"lens": __version__, "torch": torch.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    weights = save_model(folder, trainable_state(module), config, manifest)
    (folder / CHECKPOINT).unlink(missing_ok=True)
    return TrainReport(kind, folder, weights, result, seconds, module, {**manifest, "weights": weights})
