"""Similarity methods behind one registry, addressed by a spec string (like timm's ``create_model``).

A spec is a registered name (``resnet50``, ``vit``) or ``prefix:argument`` for families that take
one (``hf:facebook/dinov2-base``, ``hf:./my-local-model``). ``create_method`` loads a method once per
process and returns the cached instance afterwards.

Adding a method: write ``lens/methods/<family>.py`` that decorates its factory with
``@register_method("name")`` and add the module and the names it registers to ``_FAMILIES`` below.
A spec imports only its own family's module (``phash`` never imports torch, ``resnet50`` never
OpenCV): start-up is what the method needs, not what every method needs.

Trained methods (``autoencoder``, ``siamese``, ``finetune``; ``register_method(..., trained=True)``)
load a model folder written by ``lens train``; a :class:`lens.Gallery` gives them its own
``models/<gallery name>-<hash of its path>/<method>`` folder unless told otherwise. A local model
folder whose weights file changes (a retrained model) is loaded afresh by the next ``create_method``.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lens.errors import LensError
from lens.types import BaseMethod, Method, MethodInfo, fingerprint_arrays, l2_normalise

__all__ = [
    "BaseMethod",
    "check_spec",
    "Method",
    "MethodInfo",
    "create_method",
    "fingerprint_arrays",
    "is_trained",
    "l2_normalise",
    "list_methods",
    "method_slug",
    "parse_models",
    "reads_words",
    "register_method",
    "short_name",
]

#: Modules that register methods (importing one registers its methods) and the names each one
#: registers, ``name:`` for a prefix family: a spec imports only its family (tests check this table
#: against what the modules register).
_FAMILIES: dict[str, tuple[str, ...]] = {
    "deep": ("resnet50", "vit", "vit-in21k", "hf:"),
    "autoencoder": ("autoencoder", "autoencoder:"),
    "siamese": ("siamese", "finetune", "siamese:", "finetune:"),
    "hashing": ("phash", "dhash", "ahash"),
    "sift": ("sift",),
    "local": ("local",),
    "clip": ("clip", "siglip", "clip:"),
}

MethodFactory = Callable[..., Method]
_NAMES: dict[str, MethodFactory] = {}
_PREFIXES: dict[str, MethodFactory] = {}
_TRAINED: set[str] = set()
_Key = tuple[str, str | None, tuple[tuple[str, Any], ...], str]  # spec, model, options, LENS_RUNTIME
_CACHE: dict[_Key, tuple[tuple[int, ...], Method]] = {}
_LOADING: dict[_Key, threading.Lock] = {}
_LOCK = threading.Lock()
_loaded = False


def register_method(
    name: str, *, prefix: bool = False, trained: bool = False
) -> Callable[[MethodFactory], MethodFactory]:
    """Register ``factory(spec, model=None, **options) -> Method`` under ``name``.

    With ``prefix=True`` the factory serves every spec ``name:<argument>``. ``trained=True`` marks a
    method whose model is trained per gallery by ``lens train`` (see :func:`is_trained`).
    """

    def decorator(factory: MethodFactory) -> MethodFactory:
        (_PREFIXES if prefix else _NAMES)[name] = factory
        if trained and not prefix:
            _TRAINED.add(name)
        return factory

    return decorator


def _load_families() -> None:
    """Import every family (for listing every method, or naming the known ones in an error)."""
    global _loaded
    if not _loaded:
        for family in _FAMILIES:
            importlib.import_module(f"lens.methods.{family}")
        _loaded = True


def _family_of(spec: str) -> str | None:
    """The ``_FAMILIES`` entry that registers ``spec`` (a name or ``prefix:argument``), if any."""
    prefix, sep, argument = spec.partition(":")
    key = f"{prefix}:" if sep and argument else spec
    return next((family for family, names in _FAMILIES.items() if key in names), None)


def reads_words(spec: str) -> bool:
    """Whether the method ``spec`` names can search by words (the ``clip`` family: ``clip``,
    ``siglip``, ``clip:<id or folder>``), known without importing or loading it."""
    return _family_of(spec) == "clip"


def _load_family_of(spec: str) -> None:
    """Import the family that registers ``spec`` (a name or ``prefix:argument``); every family when
    no table entry names it (so that an unknown spec is checked against the full registry)."""
    family = _family_of(spec)
    if family is None:
        _load_families()
    else:
        importlib.import_module(f"lens.methods.{family}")


def parse_models(pairs: Sequence[str]) -> dict[str, str]:
    """Model overrides from ``NAME=PATH_OR_HUB_ID`` pairs (the ``--model`` option of the CLI and the app).

    Returns ``{method name: hub id or local path}``; raises :class:`LensError` for a malformed pair.
    """
    models = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise LensError(f"--model expects NAME=PATH_OR_HUB_ID, got '{pair}'")
        models[name.strip()] = path.strip()
    return models


def is_trained(spec: str) -> bool:
    """Whether ``spec`` names a trained method that takes its gallery's model folder by default."""
    _load_family_of(spec.strip())
    return spec.strip() in _TRAINED


def list_methods() -> list[str]:
    """Registered method names; prefixed families are shown as ``prefix:<...>``."""
    _load_families()
    return sorted(_NAMES) + [f"{p}:<id or path>" for p in sorted(_PREFIXES)]


def check_spec(spec: str) -> None:
    """Raise :class:`LensError` (listing the known methods) when ``spec`` names no registered method.

    Cheap: nothing is loaded, so callers can refuse a mistyped name before suggesting to index it.
    """
    _factory(spec.strip())


def _factory(spec: str) -> MethodFactory:
    _load_family_of(spec)
    found = _registered(spec)
    if found is None:
        _load_families()  # a family outside the table may still register it
        found = _registered(spec)
    if found is None:
        raise LensError(f"unknown method '{spec}'; known methods: {', '.join(list_methods())}")
    return found


def _registered(spec: str) -> MethodFactory | None:
    if spec in _NAMES:
        return _NAMES[spec]
    prefix, sep, argument = spec.partition(":")
    return _PREFIXES.get(prefix) if sep and argument else None


def create_method(spec: str, *, model: str | None = None, **options: Any) -> Method:
    """The method named by ``spec``, loaded once per process.

    ``model`` replaces the method's default weights (a hub id or a local path).
    """
    spec = spec.strip()
    factory = _factory(spec)
    # LENS_RUNTIME picks how deep methods run: a method loaded under another setting is another one
    runtime = os.environ.get("LENS_RUNTIME", "").strip().lower() or "auto"
    key = (spec, model, tuple(sorted(options.items())), runtime)
    stamp = _weights_stamp(model or spec.partition(":")[2])
    cached = _CACHE.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    with _LOCK:  # one lock per method: loading one model never blocks using another, and a
        lock = _LOADING.setdefault(key, threading.Lock())  # factory may create the backbone it needs
    with lock:
        cached = _CACHE.get(key)
        if cached is None or cached[0] != stamp:
            cached = (stamp, factory(spec, model=model, **options))
            _CACHE[key] = cached
    return cached[1]


def _weights_stamp(reference: str) -> tuple[int, ...]:
    """Size and time of a local model folder's weights file: changes when the model is retrained."""
    if not reference:
        return ()
    try:
        stat = (Path(os.path.expanduser(reference)) / "model.safetensors").stat()
    except (OSError, ValueError):
        return ()
    return (stat.st_size, stat.st_mtime_ns)


def method_slug(spec: str) -> str:
    """A folder name for a method spec: ``resnet50`` stays, ``hf:org/model`` becomes ``hf-org--model``."""
    prefix, sep, argument = spec.partition(":")
    if not sep:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", spec)
    argument = argument.rstrip("/\\")
    is_local = os.path.exists(os.path.expanduser(argument)) or argument.startswith((".", "/", "~"))
    if not is_local and argument.count("/") == 1:
        tail = argument.replace("/", "--")  # a hub id: org/name
    else:
        tail = re.split(r"[/\\]", argument)[-1]  # a local path: its last component
    return f"{prefix}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", tail)


def short_name(spec: str) -> str:
    """A method spec as people read it in a menu: a registered name stays (``vit``), a family's
    argument keeps its last part (``hf:facebook/dinov2-small`` -> ``dinov2-small``,
    ``hf:../weights/efficientnet_lite0.in1k/`` -> ``efficientnet_lite0.in1k``)."""
    prefix, sep, argument = spec.partition(":")
    if not sep:
        return spec
    tail = re.split(r"[/\\]", argument.rstrip("/\\"))[-1]
    return tail or spec
