"""A trained model's folder, as ``lens train`` writes it and trained methods load it.

Layout of a model folder (by default ``models/<gallery folder name>-<hash of its path>/<method>/``)::

    model.safetensors   the trained tensors (safetensors: loading never runs pickled code)
    config.json         what rebuilds the network: kind, sizes, backbone, classes, ...
    manifest.json       how it was trained: the gallery, image counts, labels, parameters, loss per
                        epoch, time, device, versions, and the weights fingerprint
    checkpoint.safetensors   only while a run is unfinished: what ``lens train ... --resume`` continues
    cache/              features of a frozen backbone, reused by later runs (safe to delete)

Every file is written to a temporary name and moved into place with ``os.replace``, so a crash never
leaves half a file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lens.errors import LensError, ModelLoadError
from lens.types import fingerprint_arrays

MODEL = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "manifest.json"


def model_folder(kind: str, spec: str, model: str | None) -> str:
    """The folder a trained method loads: ``model``, or the path in ``kind:PATH``; else say what to run."""
    folder = model or spec.partition(":")[2]
    if not folder:
        raise ModelLoadError(
            f"method '{kind}' needs a trained model: run `lens train {kind} GALLERY` and search that "
            f"gallery, or pass --model {kind}=PATH"
        )
    return folder


def replace_atomically(path: Path, write: Any) -> None:
    """Call ``write(temporary_path)``, then move the result onto ``path`` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes files private; models are meant to be shared
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (copied to contiguous CPU memory) as one safetensors file, atomically."""
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    replace_atomically(path, lambda tmp: save_file(plain, tmp, metadata=metadata))


def fingerprint(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> str:
    """The fingerprint of a trained model: its tensors and its config (which names any backbone's)."""
    named = [(name, t.detach().float().cpu().numpy()) for name, t in tensors.items()]
    named.append((CONFIG, np.frombuffer(json.dumps(config, sort_keys=True).encode(), dtype=np.uint8)))
    return fingerprint_arrays(named)


def save_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any],
               manifest: dict[str, Any]) -> str:
    """Write a model folder; returns the weights fingerprint (also recorded in the manifest).

    The three files are written in full under temporary names first, then moved into place one after
    the other, so a crash leaves the previous model (or, in the instant between the moves, a folder
    whose manifest does not match, which :func:`load_model` refuses) and never half a file.
    """
    weights = fingerprint(tensors, config)
    folder.mkdir(parents=True, exist_ok=True)
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    writers = {
        MODEL: lambda tmp: save_file(plain, tmp),
        CONFIG: lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"),
        MANIFEST: lambda tmp: Path(tmp).write_text(json.dumps({**manifest, "weights": weights}, indent=2) + "\n"),
    }
    staged: dict[str, str] = {}
    try:
        for name, write in writers.items():
            handle, staged[name] = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            os.close(handle)
            write(staged[name])
            os.chmod(staged[name], 0o644)
        for name in writers:  # the manifest last: it vouches for the other two
            os.replace(staged.pop(name), folder / name)
    finally:
        for temporary in staged.values():
            Path(temporary).unlink(missing_ok=True)
    return weights


def load_model(folder: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and config of the ``kind`` model in ``folder``, or a ModelLoadError saying what to do."""
    folder = Path(os.path.expanduser(str(folder)))
    if not (folder / MODEL).is_file() or not (folder / CONFIG).is_file():
        raise ModelLoadError(
            f"no trained {kind} model in '{folder}' (it needs {MODEL} and {CONFIG}): train one with "
            f"`lens train {kind} GALLERY --out {folder}`, or point to another with --model {kind}=PATH"
        )
    try:
        config = json.loads((folder / CONFIG).read_text())
        tensors = load_file(folder / MODEL)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(f"cannot read the trained model in '{folder}': {exc}") from exc
    if config.get("kind") != kind:
        raise ModelLoadError(
            f"'{folder}' holds a '{config.get('kind')}' model, not a '{kind}' model; "
            f"use it as method '{config.get('kind')}'"
        )
    try:
        recorded = json.loads((folder / MANIFEST).read_text()).get("weights")
    except (OSError, ValueError):
        recorded = None  # a hand-made folder without a manifest is fine
    if recorded and recorded != fingerprint(tensors, config):
        raise ModelLoadError(
            f"the files in '{folder}' come from different training runs (was a run killed while saving?); "
            f"train again with `lens train {kind} GALLERY --out {folder}`"
        )
    return tensors, config


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name (what checkpoints and trained models store)."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load ``tensors`` (by parameter name) into the trainable parameters of ``module``.

    Raises :class:`LensError` when the names do not match the trainable parameters exactly.
    """
    expected = {name for name, p in module.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        raise LensError(f"saved tensors do not fit the network ({sorted(set(tensors) ^ expected)[:3]} ...)")
    module.load_state_dict(tensors, strict=False)
