"""Indexing a gallery folder: scan it, then build each method's index incrementally.

    >>> items = scan(root, exclude=(index_dir,))            # stable ids: paths relative to root
    >>> report = build_index(root, index_dir / "vit", "vit", create_method("vit"), items)

Only new or changed images (by size, mtime, ctime and inode: see :class:`lens.store.Item`) are embedded; the rest keep their vectors from the
live build. The build is written next to the live one and published atomically (:mod:`lens.store`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from lens.embedding import Embedded, default_batch_size, embed_files
from lens.errors import IndexMismatchError, LensError
from lens.images import iter_image_files
from lens.index import DEFAULT_INDEX, KeyedIndex, create_index, default_index
from lens.store import Item, check_root, live_build, open_build, publish, read_manifest
from lens.types import LearnsFromGallery, MatchesLocally, Method

log = logging.getLogger("lens")


@dataclass
class IndexReport:
    """What one ``Gallery.index`` run did for one method."""

    method: str
    folder: Path  #: the published build
    count: int  #: images in the index
    embedded: int  #: images embedded by this run
    reused: int  #: images whose cached embedding was reused
    seconds: float
    embed_seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)  #: (path, reason) of unreadable files

    @property
    def images_per_second(self) -> float:
        """Embedding throughput of this run (images embedded / embedding seconds); 0 when none were."""
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0


def scan(root: Path, exclude: tuple[Path, ...] = (), skipped: list[tuple[str, str]] | None = None
         ) -> list[Item]:
    """Every image file below ``root`` (recursive; ``exclude``: folders skipped, e.g. the index folder),
    with what identifies its version: its path relative to ``root`` (its id, an OS path as text),
    size in bytes, mtime and ctime in ns, and inode.

    Linked folders are followed (a folder reached twice, e.g. a loop, once); dangling or looping
    links and files that vanish meanwhile are left out with a warning and appended to ``skipped`` as
    (path, reason) (see :func:`lens.images.iter_image_files`).
    """
    items = []

    def relative(path: Path) -> str:
        return path.relative_to(root).as_posix() if path != root else "."

    def skip(path: Path, reason: str) -> None:
        if skipped is not None:
            skipped.append((relative(path), reason))

    for path in iter_image_files(root, exclude=exclude, on_skip=skip):
        try:
            stat = path.stat()
        except OSError as exc:
            log.warning("skipped %s: %s", path, exc.strerror or exc)
            skip(path, f"cannot read it: {exc.strerror or exc}")
            continue
        items.append(Item(relative(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino))
    return items


def scan_files(files: Mapping[str, Path]) -> list[Item]:
    """The images of an explicit gallery ({id: file}, in that order), with their size and mtime in ns.

    Raises :class:`LensError` for a file that cannot be read.
    """
    items = []
    for key, file in files.items():
        try:
            stat = Path(file).stat()
        except OSError as exc:
            raise LensError(f"gallery image '{file}' cannot be read: {exc.strerror or exc}") from exc
        items.append(Item(key, stat.st_size, stat.st_mtime_ns))
    return items


def build_index(
    root: Path,
    method_dir: Path,
    spec: str,
    base: Method,
    items: list[Item],
    *,
    index_spec: str | None = None,
    batch_size: int | None = None,
    workers: int = 2,
    progress: bool = True,
    on_progress: Callable[[str, int, int], None] | None = None,
    gallery_root: str | None = None,
    files: Mapping[str, Path] | None = None,
    learn_from: Collection[str] | None = None,
    embed: Callable[..., Embedded] = embed_files,
) -> IndexReport:
    """Build or refresh ``method_dir``'s index of the gallery ``root`` with the method ``base``.

    ``items`` (from :func:`scan`) are the gallery's images now; only those new or changed since the
    live build are embedded, the others keep their stored vectors (when the weights are the same).
    A method that learns from the gallery (:class:`~lens.types.LearnsFromGallery`) is fitted first,
    or restored from the live build. The build is published atomically (:func:`lens.store.publish`)
    under a file lock, so concurrent builders of the same method take turns.

    ``index_spec``: the index backend (:func:`lens.index.create_index`); None keeps the one an
    earlier build was asked for, else one that suits the size. A method that retrieves with its own
    index (:class:`~lens.types.MatchesLocally`: ``local``'s inverted file) gets no vector index
    (the manifest's ``index`` is null) and ``index_spec`` is ignored for it. ``batch_size`` (images per model
    call) defaults to 8 on CPU and 32 on a GPU; ``workers`` decode in parallel; ``on_progress(spec,
    done, total)`` reports each batch. ``gallery_root`` (the resolved root, an OS path) is recorded in
    the build; a live build made for another root is rebuilt for this one (with a warning naming
    both). ``files``: where images are whose file is not ``root / id`` (an explicit gallery,
    :func:`scan_files`). ``learn_from``: the ids a method that learns from the gallery is fitted on
    (default: every item). ``embed``: what turns the new images into vectors, with
    :func:`lens.embedding.embed_files`'s arguments and result (default: it, in this process; a Ray
    cluster's: :meth:`lens.distributed.RayCluster.embedder`). Raises :class:`LensError` when none of
    the images can be read.
    """
    files = files or {}
    started = time.perf_counter()
    method_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(method_dir / ".lock")):
        learning = [item for item in items if learn_from is None or item.path in learn_from]
        method, restored = _method_to_index(method_dir, spec, base,
                                            [files.get(item.path, root / item.path) for item in learning])
        info = method.info
        keeps_items = isinstance(method, LearnsFromGallery)
        cached, previous_vectors, previous_spec = _cached_vectors(method_dir, method, gallery_root)
        if keeps_items and not restored:
            cached = {}  # its stored per-image data is not reusable: prepare every image again
        fresh = [item for item in items if item not in cached]
        batch_size = batch_size or default_batch_size(method)
        embed_started = time.perf_counter()
        by_file = {files.get(item.path, root / item.path): item.path for item in fresh}
        embedded = embed(
            method, list(by_file),
            batch_size=batch_size, workers=workers, progress=progress, desc=spec,
            on_progress=(lambda done, total: on_progress(spec, done, total)) if on_progress else None,
            keep_prepared=keeps_items,
        )
        embed_seconds = time.perf_counter() - embed_started
        by_path = {item.path: item for item in fresh}
        new_rows = {by_file[path]: row for row, path in enumerate(embedded.paths)}
        kept: list[Item] = []
        rows: list[np.ndarray] = []
        per_item: list[Any] = []  # prepare() outputs kept in the build, for LearnsFromGallery
        for item in items:
            if item in cached:
                kept.append(item)
                rows.append(previous_vectors[cached[item]])
                if keeps_items:
                    per_item.append(method.stored_item(cached[item]))
            elif item.path in new_rows:
                kept.append(by_path[item.path])
                rows.append(embedded.vectors[new_rows[item.path]])
                if keeps_items:
                    per_item.append(embedded.prepared[new_rows[item.path]])
        if not kept:
            raise LensError(f"none of the {len(items)} images in '{root}' could be read")
        vectors = np.stack(rows)  # cached and new rows come from the same method: one dtype
        if isinstance(method, MatchesLocally):
            chosen, index = None, None  # it retrieves with its own index (save_state): no vector index
        else:  # an index asked for (now or by an earlier build) is kept; else one that suits the size
            chosen = index_spec or previous_spec
            index = create_index(chosen or default_index(len(vectors), info.metric), info.dim, info.metric)
        if isinstance(index, KeyedIndex):  # a database: updated in place (upsert + delete), not rebuilt
            index.sync([item.path for item in kept], vectors, {item.path for item in fresh},
                       gallery=gallery_root or str(root.resolve()), method=method_dir.name,
                       facts={**info.as_dict(), "gallery": gallery_root, "writer": str(method_dir.resolve())})
        elif index is not None:
            index.build(vectors)
        skipped = [(by_file[p], why) for p, why in embedded.skipped]
        folder = publish(
            method_dir, info, kept, vectors, index,
            build={
                "batch_size": batch_size,
                "embedded": len(embedded.paths),
                "reused": len(kept) - len(embedded.paths),
                "skipped": skipped,
                "seconds": round(time.perf_counter() - started, 3),
                "index_given": chosen is not None,
            },
            write_extra=(lambda folder: method.save_state(folder, per_item)) if keeps_items else None,
            gallery_root=gallery_root,
        )
    return IndexReport(
        spec, folder, len(kept), len(embedded.paths), len(kept) - len(embedded.paths),
        time.perf_counter() - started, embed_seconds, skipped,
    )

def _method_to_index(method_dir: Path, spec: str, base: Method, learn_from: list[Path]
                     ) -> tuple[Method, bool]:
    """The method to embed the gallery with, and whether it was restored from the live build.

    A method that learns from the gallery keeps what the live build learned (so unchanged
    images keep their vectors), or, without a usable one, is fitted on the ``learn_from`` images.
    """
    if not isinstance(base, LearnsFromGallery):
        return base, False
    build = live_build(method_dir)
    if build is not None:
        try:
            return base.load_state(build), True
        except LensError as exc:
            log.warning("%s: cannot reuse what the last build learned (%s); learning it again", spec, exc)
    return base.fit(learn_from), False

def _cached_vectors(
    method_dir: Path, method: Method, gallery_root: str | None = None
) -> tuple[dict[Item, int], np.ndarray, str | None]:
    """Rows of the live build reusable with the same weights: {item: row}, its vectors, its index spec."""
    none = np.zeros((0, method.info.dim), np.float32)
    try:
        manifest = read_manifest(method_dir)
        if manifest is None:
            return {}, none, None
        if (manifest.get("weights"), manifest.get("dim")) != (method.info.weights, method.info.dim):
            log.warning("%s: model changed since the last build; embedding every image again",
                        method.info.name)
            return {}, none, _given_spec(manifest)
        stored = open_build(method_dir, method.info, verify=True)
    except (LensError, KeyError) as exc:
        log.warning("%s: previous index unusable (%s); embedding every image again", method_dir, exc)
        return {}, none, None
    if gallery_root is not None:
        try:
            check_root(stored.manifest, gallery_root, method_dir, stored.folder)
        except IndexMismatchError:
            # rows are reused only for files with the same path, size, times and inode: never another's
            log.warning("%s was built for the gallery '%s', not '%s': rebuilding it for '%s'",
                        method_dir, stored.manifest.get("gallery"), gallery_root, gallery_root)
    rows = {item: row for row, item in enumerate(stored.items)}
    return rows, np.asarray(stored.vectors), _given_spec(stored.manifest)


def _given_spec(manifest: dict[str, Any]) -> str | None:
    """The index spec of a build when it was asked for (kept by later builds); None when it was a default."""
    given = manifest.get("build", {}).get("index_given")
    if given is None:  # builds before the size-based default: only plain "annoy" was a default
        given = manifest.get("index") != DEFAULT_INDEX
    return manifest.get("index") if given else None
