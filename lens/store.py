"""One method's index on disk: versioned build folders published atomically.

Layout of ``<index dir>/<method slug>/``::

    CURRENT                 name of the live build folder (replaced atomically with os.replace)
    build-<stamp>/
        manifest.json       method, model, weights fingerprint, dim, metric, count, index spec, the
                            gallery root it indexes, build parameters, lens version, time, and a
                            sha256 of every other file
        READERS             empty; readers hold a shared lock on it while they open the build
        items.json          the indexed images: row i = {"path", "size", "mtime_ns", "ctime_ns", "inode"}
        vectors.npy         row i = the embedding of items[i] (the embedding cache, and exact re-ranking)
        <index files>       written by the index backend
        <method files>      written by methods that learn from the gallery (e.g. SIFT's vocabulary
                            and keypoints, see ``LearnsFromGallery``)

A build is written into a fresh folder and only becomes live when ``CURRENT`` is replaced, so an
interrupted build never damages the index that was there before.

Readers and a writer at the same time (``lens search`` while ``lens index`` runs, the app while it
rebuilds): a reader reads ``CURRENT`` once per open and opens that build under a shared ``flock`` on
its ``READERS`` file. The writer removes a superseded build only when it can take that lock
exclusively (no reader is opening it), first renaming it out of the way, so a reader gets the old
complete build or the new one, never a mix or a half-deleted folder; a build skipped because a
reader held it is removed by the next publish. What an open reader keeps (memory-mapped vectors and
index files) stays valid after the folder is removed (POSIX keeps unlinked files mapped).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lens.errors import CorruptIndexError, IndexMismatchError, IndexNotFoundError
from lens.index import KeyedIndex, VectorIndex, load_index
from lens.types import MethodInfo

log = logging.getLogger("lens")

POINTER = "CURRENT"
MANIFEST = "manifest.json"
ITEMS = "items.json"
VECTORS = "vectors.npy"
READERS = "READERS"
#: Times a reader re-reads ``CURRENT`` when the build it read was superseded and removed before it
#: could lock it (each time a newer build was published in between).
OPEN_ATTEMPTS = 20


@dataclass(frozen=True)
class Item:
    """An indexed image: its path relative to the gallery root, and what identifies its version.

    ``path`` is an OS path as text (undecodable bytes as surrogate escapes, PEP 383; JSON keeps them
    as ``\\udcXX`` escapes, losslessly). The version is the file's size, modification time, status
    change time (``st_ctime_ns``) and inode: a file rewritten in place with the same size and a
    restored modification time (``cp -p``, ``rsync -t``) still gets a new ctime, which no user
    program can set back, so its cached embedding is not reused. The price: a ``chmod``, ``chown``,
    new hard link or a copy of the gallery to another disk also changes ctime or inode, and those
    files are embedded again once (a content hash would avoid that but read every file every run).
    """

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int = 0  #: 0 in builds made before lens recorded it: such rows are embedded again once
    inode: int = 0


@dataclass
class StoredIndex:
    """A published build, opened: its manifest, items, vectors and search index.

    ``vectors``: ``(n, dim)`` float32 (cosine) or ``(n, dim / 8)`` uint8 packed bits (hamming), memory-mapped;
    row i is ``items[i]``'s.
    """

    folder: Path
    manifest: dict[str, Any]
    items: list[Item]
    vectors: np.ndarray
    #: the vector index; None for a method that retrieves with its own (``MatchesLocally``: ``local``)
    index: VectorIndex | None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def live_build(method_dir: Path) -> Path | None:
    """The published build folder of a method, or None when nothing was published.

    When the build ``CURRENT`` named is gone by the time it is looked at (a writer superseded and
    removed it meanwhile), ``CURRENT`` is read again.
    """
    previous = None
    for _ in range(OPEN_ATTEMPTS):
        try:
            name = (method_dir / POINTER).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise CorruptIndexError(f"cannot read {method_dir / POINTER}: {exc}") from exc
        build = method_dir / name
        if name and build.is_dir():
            return build
        if name == previous:
            return None  # CURRENT names a folder that does not exist
        previous = name
    return None


@contextmanager
def reading(method_dir: Path) -> Iterator[Path | None]:
    """The live build of ``method_dir``, which no writer removes until the block ends (None if none).

    ``CURRENT`` is read once; the build is held by a shared lock on its ``READERS`` file. When the
    writer removed that build between the read and the lock (a newer one was published meanwhile),
    ``CURRENT`` is read again.
    """
    for _ in range(OPEN_ATTEMPTS):
        build = live_build(method_dir)
        if build is None:
            yield None
            return
        try:
            handle = os.open(build / READERS, os.O_RDONLY)
        except FileNotFoundError:
            if not build.is_dir():
                continue  # superseded and removed since CURRENT was read: read it again
            yield build  # a build written before READERS existed: nothing to lock
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_SH)
            if not (build / READERS).exists():
                continue  # removed while we waited for the lock: read CURRENT again
            yield build
            return
        finally:
            os.close(handle)  # releases the lock
    raise CorruptIndexError(f"the index in {method_dir} changed {OPEN_ATTEMPTS} times while being opened; "
                            "try again when the indexing run is over")


def publish(
    method_dir: Path,
    info: MethodInfo,
    items: list[Item],
    vectors: np.ndarray,
    index: VectorIndex | None,
    build: dict[str, Any],
    write_extra: Callable[[Path], list[str]] | None = None,
    gallery_root: str | None = None,
) -> Path:
    """Write a complete build and make it the live one; older builds no reader holds are removed.

    ``write_extra(folder)`` writes more files into the build (returning their names); they are
    checksummed in the manifest like the rest. ``index`` None: no vector index (a method that retrieves
    with its own, written by ``write_extra``); the manifest's ``index`` is then null. ``gallery_root``
    (the resolved gallery folder, as an OS path) is recorded so that the index is never searched as
    another gallery's.
    """
    from lens.version import __version__

    method_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=method_dir))
    try:
        np.save(staging / VECTORS, np.ascontiguousarray(vectors))
        _write_json(staging / ITEMS, [item.__dict__ for item in items])
        files = [VECTORS, ITEMS, *(index.save(staging) if index is not None else []),
                 *(write_extra(staging) if write_extra else [])]
        manifest = {
            **info.as_dict(),
            "count": len(items),
            "index": index.spec if index is not None else None,
            "gallery": gallery_root,
            "gallery_from_index": _from_index(gallery_root, method_dir),
            "build": build,
            "lens_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {name: {"sha256": _sha256(staging / name), "bytes": (staging / name).stat().st_size}
                      for name in files},
        }
        _write_json(staging / MANIFEST, manifest)
        (staging / READERS).touch()
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
    """Remove superseded builds that no reader is opening, and leftovers of interrupted runs."""
    for child in method_dir.iterdir():
        if not child.is_dir() or child.name == keep:
            continue
        if child.name.startswith((".staging-", ".trash-")):
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.startswith("build-"):
            try:
                _remove_unread(child)
            except OSError as exc:  # the new build is live: a leftover is no reason to fail
                log.warning("cannot remove the superseded build %s: %s", child, exc)


def _remove_unread(build: Path) -> None:
    try:
        handle = os.open(build / READERS, os.O_RDONLY)
    except FileNotFoundError:
        handle = None  # a build from before READERS existed
    try:
        if handle is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    return  # a reader is opening it: the next publish removes it
                raise
        trash = build.with_name(f".trash-{build.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(build, trash)  # readers that wait for the lock now find it gone
    finally:
        if handle is not None:
            os.close(handle)
    shutil.rmtree(trash, ignore_errors=True)


def _load_manifest(build: Path) -> dict[str, Any]:
    try:
        return json.loads((build / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptIndexError(f"cannot read {build / MANIFEST}: {exc}") from exc


def read_manifest(method_dir: Path) -> dict[str, Any] | None:
    """The manifest of the live build of ``method_dir`` as a dict (see the module for its keys), or None
    when nothing was published. Raises :class:`~lens.errors.CorruptIndexError` when ``CURRENT`` or the
    manifest cannot be read or parsed."""
    with reading(method_dir) as build:
        return None if build is None else _load_manifest(build)


def _from_index(root: str | None, method_dir: Path) -> str | None:
    return None if root is None else os.path.relpath(root, method_dir.resolve())


def check_root(manifest: dict[str, Any], root: str, method_dir: Path, where: Path) -> None:
    """Refuse an index that was built for another gallery folder than ``root`` (resolved, an OS path).

    The index fits when it was built for ``root``, or for the folder at the same place relative to
    the index (a gallery moved or checked out elsewhere together with its index folder).
    """
    built_for = manifest.get("gallery")
    if built_for is not None and built_for != root and (
        manifest.get("gallery_from_index") != _from_index(root, method_dir)
    ):
        raise IndexMismatchError(
            f"the index in {where} was built for the gallery '{built_for}', not for '{root}'. "
            f"Index this gallery with `lens index {root}` (its default index folder is its own), "
            "or pass --index-dir / index_dir= with a folder of its own."
        )


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


def open_build(
    method_dir: Path, info: MethodInfo, *, verify: bool = True, build: Path | None = None,
    root: str | None = None,
) -> StoredIndex:
    """Open the live build of ``method_dir`` (or ``build``, held by :func:`reading`) for ``info``'s
    method, checking it fits, is intact and, given ``root``, indexes that gallery folder.

    ``verify``: check every file's sha256 (else only its size). Raises
    :class:`~lens.errors.IndexNotFoundError` when nothing was published,
    :class:`~lens.errors.IndexMismatchError` for a build of other weights, dimension or metric (or
    another gallery), and :class:`~lens.errors.CorruptIndexError` for a missing or damaged file.
    """
    if build is None:
        with reading(method_dir) as live:
            if live is None:
                raise IndexNotFoundError(f"no index for method '{info.name}' in {method_dir.parent}")
            return open_build(method_dir, info, verify=verify, build=live, root=root)
    manifest = _load_manifest(build)
    check_compatible(manifest, info, build)
    if root is not None:
        check_root(manifest, root, method_dir, build)
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
    spec = manifest.get("index")
    index = load_index(build, spec, int(manifest["dim"]), manifest["metric"]) if spec is not None else None
    if isinstance(index, KeyedIndex):  # vectors in a database: search results map to this build's rows
        index.attach([item.path for item in items], manifest)
    return StoredIndex(build, manifest, items, vectors, index)
