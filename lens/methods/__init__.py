"""Similarity methods behind one registry, addressed by a spec string (like timm's ``create_model``).

A spec is a registered name (``resnet50``, ``vit``) or ``prefix:argument`` for families that take
one (``hf:facebook/dinov2-base``, ``hf:./my-local-model``). ``create_method`` loads a method once per
process and returns the cached instance afterwards.

Adding a method: write ``lens/methods/<family>.py`` that decorates its factory with
``@register_method("name")`` and add the module's name to ``_FAMILIES`` below.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Callable
from typing import Any

from lens.errors import LensError
from lens.methods.base import BaseMethod, Method, MethodInfo, fingerprint_arrays, l2_normalise

__all__ = [
    "BaseMethod",
    "Method",
    "MethodInfo",
    "create_method",
    "fingerprint_arrays",
    "l2_normalise",
    "list_methods",
    "method_slug",
    "register_method",
]

#: Modules that register methods; importing one registers its methods.
_FAMILIES = ["deep", "hashing", "sift"]

MethodFactory = Callable[..., Method]
_NAMES: dict[str, MethodFactory] = {}
_PREFIXES: dict[str, MethodFactory] = {}
_CACHE: dict[tuple[str, str | None, tuple[tuple[str, Any], ...]], Method] = {}
_LOCK = threading.Lock()
_loaded = False


def register_method(name: str, *, prefix: bool = False) -> Callable[[MethodFactory], MethodFactory]:
    """Register ``factory(spec, model=None, **options) -> Method`` under ``name``.

    With ``prefix=True`` the factory serves every spec ``name:<argument>``.
    """

    def decorator(factory: MethodFactory) -> MethodFactory:
        (_PREFIXES if prefix else _NAMES)[name] = factory
        return factory

    return decorator


def _load_families() -> None:
    global _loaded
    if not _loaded:
        for family in _FAMILIES:
            importlib.import_module(f"lens.methods.{family}")
        _loaded = True


def list_methods() -> list[str]:
    """Registered method names; prefixed families are shown as ``prefix:<...>``."""
    _load_families()
    return sorted(_NAMES) + [f"{p}:<id or path>" for p in sorted(_PREFIXES)]


def _factory(spec: str) -> MethodFactory:
    _load_families()
    if spec in _NAMES:
        return _NAMES[spec]
    prefix, sep, argument = spec.partition(":")
    if sep and prefix in _PREFIXES and argument:
        return _PREFIXES[prefix]
    raise LensError(f"unknown method '{spec}'; known methods: {', '.join(list_methods())}")


def create_method(spec: str, *, model: str | None = None, **options: Any) -> Method:
    """The method named by ``spec``, loaded once per process.

    ``model`` replaces the method's default weights (a hub id or a local path).
    """
    spec = spec.strip()
    factory = _factory(spec)
    key = (spec, model, tuple(sorted(options.items())))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = factory(spec, model=model, **options)
        return _CACHE[key]


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
