"""One method's index on disk: versioned build folders published atomically.

Layout of ``<index dir>/<method slug>/``::

    CURRENT                 name of the live build folder (replaced atomically with os.replace)
    build-<stamp>/
        manifest.json       method, model, weights fingerprint, dim, metric, count, index spec,
                            build parameters, lens version, time, and a sha256 of every other file
        items.json          the indexed images: row i = {"path", "size", "mtime_ns"}
        vectors.npy         row i = the embedding of items[i] (the embedding cache, and exact re-ranking)
        <index files>       written by the index backend
        <method files>      written by methods that learn from the gallery (e.g. SIFT's vocabulary
                            and keypoints, see ``LearnsFromGallery``)

A build is written into a fresh folder and only becomes live when ``CURRENT`` is replaced, so an
interrupted build never damages the index that was there before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lens.errors import CorruptIndexError, IndexMismatchError, IndexNotFoundError
from lens.index import VectorIndex, load_index
from lens.types import MethodInfo

POINTER = "CURRENT"
MANIFEST = "manifest.json"
ITEMS = "items.json"
VECTORS = "vectors.npy"


@dataclass(frozen=True)
class Item:
    """An indexed image: its path relative to the gallery root, and what identifies its version."""

    path: str
    size: int
    mtime_ns: int


@dataclass
class StoredIndex:
    """A published build, opened: its manifest, items, vectors and search index."""

    folder: Path
    manifest: dict[str, Any]
    items: list[Item]
    vectors: np.ndarray
    index: VectorIndex


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def live_build(method_dir: Path) -> Path | None:
    """The published build folder of a method, or None when nothing was published."""
    pointer = method_dir / POINTER
    if not pointer.is_file():
        return None
    build = method_dir / pointer.read_text().strip()
    return build if build.is_dir() else None


def publish(
    method_dir: Path,
    info: MethodInfo,
    items: list[Item],
    vectors: np.ndarray,
    index: VectorIndex,
    build: dict[str, Any],
    write_extra: Callable[[Path], list[str]] | None = None,
) -> Path:
    """Write a complete build and make it the live one; older builds are removed afterwards.

    ``write_extra(folder)`` writes more files into the build (returning their names); they are
    checksummed in the manifest like the rest.
    """
    from lens.version import __version__

    method_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=method_dir))
    try:
        np.save(staging / VECTORS, np.ascontiguousarray(vectors))
        _write_json(staging / ITEMS, [item.__dict__ for item in items])
        files = [VECTORS, ITEMS, *index.save(staging), *(write_extra(staging) if write_extra else [])]
        manifest = {
            **info.as_dict(),
            "count": len(items),
            "index": index.spec,
            "build": build,
            "lens_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {name: {"sha256": _sha256(staging / name), "bytes": (staging / name).stat().st_size}
                      for name in files},
        }
        _write_json(staging / MANIFEST, manifest)
        _fsync_tree(staging)
        final = method_dir / f"build-{time.strftime('%Y%m%d-%H%M%S')}-{staging.name[-8:]}"
        os.replace(staging, final)
        pointer_tmp = method_dir / f".{POINTER}.tmp"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, method_dir / POINTER)  # the atomic switch to the new build
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _remove_stale(method_dir, keep=final.name)
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _remove_stale(method_dir: Path, keep: str) -> None:
    for child in method_dir.iterdir():
        if child.is_dir() and child.name != keep and child.name.startswith(("build-", ".staging-")):
            shutil.rmtree(child, ignore_errors=True)


def read_manifest(method_dir: Path) -> dict[str, Any] | None:
    build = live_build(method_dir)
    if build is None:
        return None
    try:
        return json.loads((build / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptIndexError(f"cannot read {build / MANIFEST}: {exc}") from exc


def check_compatible(manifest: dict[str, Any], info: MethodInfo, where: Path) -> None:
    """Refuse an index built by another model, weights, metric or dimension than ``info``'s."""
    built = (manifest.get("model"), manifest.get("weights"), manifest.get("dim"), manifest.get("metric"))
    if built[1:] == (info.weights, info.dim, info.metric):
        return
    raise IndexMismatchError(
        f"the index in {where} was built with model '{built[0]}' (weights {built[1]}, "
        f"dim {built[2]}, {built[3]}), but method '{info.name}' now uses model '{info.model}' "
        f"(weights {info.weights}, dim {info.dim}, {info.metric}). Rebuild it with "
        f"`lens index GALLERY --methods {info.name}` and the same --model option, "
        "or search with the model it was built with."
    )


def open_build(method_dir: Path, info: MethodInfo, *, verify: bool = True) -> StoredIndex:
    """Open the live build of ``method_dir`` for ``info``'s method, checking it fits and is intact."""
    build = live_build(method_dir)
    if build is None:
        raise IndexNotFoundError(f"no index for method '{info.name}' in {method_dir.parent}")
    manifest = read_manifest(method_dir)
    assert manifest is not None
    check_compatible(manifest, info, build)
    for name, expected in manifest.get("files", {}).items():
        path = build / name
        if not path.is_file() or path.stat().st_size != expected["bytes"] or (
            verify and _sha256(path) != expected["sha256"]
        ):
            raise CorruptIndexError(
                f"index file {path} is missing or damaged (checksum mismatch); rebuild it with "
                f"`lens index GALLERY --methods {info.name}`"
            )
    try:
        items = [Item(**entry) for entry in json.loads((build / ITEMS).read_text())]
        vectors = np.load(build / VECTORS, mmap_mode="r")
    except (OSError, ValueError, TypeError) as exc:
        raise CorruptIndexError(f"cannot read index in {build}: {exc}") from exc
    index = load_index(build, manifest["index"], int(manifest["dim"]), manifest["metric"])
    return StoredIndex(build, manifest, items, vectors, index)
