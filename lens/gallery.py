"""A folder of images and its per-method indexes: build them, keep them fresh, search them.

    >>> from lens import Gallery
    >>> gallery = Gallery("photos/")                      # indexes in ./indexes/photos-<hash of its path>/
    >>> gallery.index(["resnet50", "vit"])                 # embeds only new or changed files
    >>> gallery.search("query.jpg", method="vit", k=10, box=(10, 20, 200, 240))
    >>> gallery.search("query.jpg", method="sift", k=10, rerank="all")   # brute-force matching

Trained methods (``autoencoder``, ``siamese``, ``finetune``) use the model ``lens train`` wrote for this
gallery, ``models/<gallery folder name>/<method>/``, unless ``models=`` or ``models_dir=`` says otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from filelock import FileLock

from lens.embedding import default_batch_size, embed_files
from lens.errors import CorruptIndexError, IndexMismatchError, IndexNotFoundError, LensError
from lens.images import IMAGE_EXTENSIONS, ImageSource, crop, display_path, iter_image_files, load_image
from lens.index import DEFAULT_INDEX, create_index, default_index, rerank_exact
from lens.methods import Method, create_method, is_trained, method_slug
from lens.methods.base import LearnsFromGallery, Reranks
from lens.store import (Item, StoredIndex, check_root, live_build, open_build, publish, read_manifest,
                        reading)

log = logging.getLogger("lens")

Box = tuple[float, float, float, float]
Rerank = Union[int, Literal["all"], None]  #: candidates to re-rank: a number, "all", or None = default


@dataclass(frozen=True)
class SearchResult:
    rank: int  #: 1 = best
    path: str  #: the image's path relative to the gallery root (its id)
    score: float  #: similarity in [0, 1], 1 = identical; or a count, see ``kind``
    file: Path  #: where the image is on disk
    #: what ``score`` is: ``cosine`` or ``hamming`` similarity in [0, 1], or ``inliers`` (a count of
    #: RANSAC-verified keypoint matches, from a method's re-ranking)
    kind: str = "cosine"

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "path": str(self.file), "score": round(self.score, 6),
                "score_kind": self.kind}

    @property
    def score_text(self) -> str:
        return f"{self.score:.0f} inliers" if self.kind == "inliers" else f"{self.score:.3f}"


#: What each kind of score means, for people.
SCORE_LABELS = {
    "cosine": "cosine similarity, 1 = identical",
    "hamming": "1 - Hamming distance / bits, 1 = identical",
    "inliers": "RANSAC-verified keypoint matches (inliers), more = more alike",
}


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
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0


def default_index_dir(root: str | Path) -> Path:
    """``indexes/<folder name>-<8 hex digits of a sha256 of its path>`` (relative to the working
    directory): one folder per gallery root, so that two galleries with the same folder name
    (``2023/photos``, ``2024/photos``) never share an index.

    The path hashed is the resolved root relative to the working directory when it lies below it
    (so a repository checked out elsewhere, e.g. a Space, finds its prebuilt ``indexes/``), else the
    resolved absolute path.
    """
    resolved, here = Path(root).resolve(), Path.cwd().resolve()
    key = resolved.relative_to(here) if resolved.is_relative_to(here) else resolved
    digest = hashlib.sha256(os.fsencode(key.as_posix())).hexdigest()[:8]
    return Path("indexes") / f"{resolved.name or 'root'}-{digest}"


class Gallery:
    """A folder of images (searched recursively) and where its indexes live.

    ``index_dir`` defaults to :func:`default_index_dir` (relative to the working directory); every
    build records the resolved root it indexes, and an index built for another root is refused for
    searching (:class:`IndexMismatchError`) and rebuilt by :meth:`index`.
    """

    def __init__(
        self,
        root: str | Path,
        index_dir: str | Path | None = None,
        *,
        models: Mapping[str, str] | None = None,
        models_dir: str | Path | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise LensError(f"gallery folder '{root}' does not exist or is not a folder")
        self.name = self.root.resolve().name
        #: the resolved root as an OS path: what every build records as the gallery it indexes
        self.root_id = os.fspath(self.root.resolve())
        self.index_dir = Path(index_dir) if index_dir else default_index_dir(self.root)
        self.models = dict(models or {})  #: method name -> hub id or local path replacing its default
        #: where ``lens train`` puts this gallery's trained models, one folder per method
        self.models_dir = Path(models_dir) if models_dir else Path("models") / self.name
        #: spec -> (live index, the method fitted to it, the base method it was made from)
        self._opened: dict[str, tuple[StoredIndex, Method, Method]] = {}
        self._lock = threading.Lock()  # guards the two dicts
        self._open_locks: dict[str, threading.Lock] = {}  # one per method: methods open in parallel

    # -- methods and their folders ---------------------------------------------------------------
    def method(self, spec: str) -> Method:
        """The loaded method ``spec``, with this gallery's model override if any (cached per process).

        A method that learns from the gallery (SIFT) comes with what it learned from this gallery's
        live index, once there is one.
        """
        base = self._base_method(spec)
        if isinstance(base, LearnsFromGallery) and live_build(self.method_dir(spec)) is not None:
            return self._open(spec)[1]
        return base

    def _base_method(self, spec: str) -> Method:
        return create_method(spec, model=self.model_for(spec))

    def model_for(self, spec: str) -> str | None:
        """The model ``spec`` uses here: the override, this gallery's trained model, or None (its default)."""
        model = self.models.get(spec)
        if model is None and is_trained(spec):
            model = str(self.models_dir / method_slug(spec))
        return model

    def method_dir(self, spec: str) -> Path:
        return self.index_dir / method_slug(spec)

    def indexed_methods(self) -> list[str]:
        """Methods with a published index for this gallery, by name."""
        found = []
        if self.index_dir.is_dir():
            for folder in sorted(self.index_dir.iterdir()):
                try:
                    manifest = read_manifest(folder) if folder.is_dir() else None
                except CorruptIndexError as exc:
                    log.warning("%s", exc)
                    continue
                if manifest:
                    found.append(str(manifest["method"]))
        return found

    def manifest(self, spec: str) -> dict[str, Any] | None:
        return read_manifest(self.method_dir(spec))

    # -- indexing --------------------------------------------------------------------------------
    def scan(self, skipped: list[tuple[str, str]] | None = None) -> list[Item]:
        """Every image file below the root (the index folder excluded), with what identifies its version.

        Linked folders are followed (loops left out); dangling or looping links and files that vanish
        meanwhile are left out with a warning and appended to ``skipped`` as (path, reason).
        """
        items = []

        def skip(path: Path, reason: str) -> None:
            if skipped is not None:
                skipped.append((self._relative(path), reason))

        for path in iter_image_files(self.root, exclude=(self.index_dir,), on_skip=skip):
            try:
                stat = path.stat()
            except OSError as exc:
                log.warning("skipped %s: %s", path, exc.strerror or exc)
                skip(path, f"cannot read it: {exc.strerror or exc}")
                continue
            items.append(Item(self._relative(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
                              stat.st_ino))
        return items

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if path != self.root else "."

    def index(
        self,
        methods: Iterable[str],
        *,
        index_spec: str | None = None,
        batch_size: int | None = None,
        workers: int = 2,
        progress: bool = True,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> list[IndexReport]:
        """Build or refresh the index of every method; only new or changed images are embedded.

        ``progress`` shows a progress bar; ``on_progress(method, done, total)`` reports each batch.
        ``batch_size`` (images per model call) defaults to 8 on CPU and 32 on a GPU.
        """
        scan_skipped: list[tuple[str, str]] = []
        items = self.scan(scan_skipped)
        if not items:
            raise LensError(f"no images found in '{self.root}' (looked for {len(IMAGE_EXTENSIONS)} image file "
                            "extensions: .jpg, .png, .webp, .avif, .heic, .tif, .bmp, .gif, ...; see the README)")
        reports = []
        for spec in methods:
            report = self._index_one(spec, items, index_spec, batch_size, workers, progress, on_progress)
            report.skipped[:0] = scan_skipped
            reports.append(report)
        return reports

    def _index_one(
        self,
        spec: str,
        items: list[Item],
        index_spec: str | None,
        batch_size: int | None,
        workers: int,
        progress: bool,
        on_progress: Callable[[str, int, int], None] | None,
    ) -> IndexReport:
        started = time.perf_counter()
        method_dir = self.method_dir(spec)
        method_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(method_dir / ".lock")):
            method, restored = self._method_to_index(spec, method_dir, items)
            info = method.info
            keeps_items = isinstance(method, LearnsFromGallery)
            cached, previous_vectors, previous_spec = self._cached_vectors(method_dir, method)
            if keeps_items and not restored:
                cached = {}  # its stored per-image data is not reusable: prepare every image again
            fresh = [item for item in items if item not in cached]
            batch_size = batch_size or default_batch_size(method)
            embed_started = time.perf_counter()
            embedded = embed_files(
                method, [self.root / item.path for item in fresh],
                batch_size=batch_size, workers=workers, progress=progress, desc=spec,
                on_progress=(lambda done, total: on_progress(spec, done, total)) if on_progress else None,
                keep_prepared=keeps_items,
            )
            embed_seconds = time.perf_counter() - embed_started
            by_path = {item.path: item for item in fresh}
            new_rows = {
                path.relative_to(self.root).as_posix(): row for row, path in enumerate(embedded.paths)
            }
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
                raise LensError(f"none of the {len(items)} images in '{self.root}' could be read")
            vectors = np.stack(rows)  # cached and new rows come from the same method: one dtype
            # an index asked for (now or by an earlier build) is kept; else one that suits the size
            chosen = index_spec or previous_spec
            index = create_index(chosen or default_index(len(vectors), info.metric), info.dim, info.metric)
            index.build(vectors)
            skipped = [(p.relative_to(self.root).as_posix(), why) for p, why in embedded.skipped]
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
                gallery_root=self.root_id,
            )
        return IndexReport(
            spec, folder, len(kept), len(embedded.paths), len(kept) - len(embedded.paths),
            time.perf_counter() - started, embed_seconds, skipped,
        )

    def _method_to_index(self, spec: str, method_dir: Path, items: list[Item]) -> tuple[Method, bool]:
        """The method to embed the gallery with, and whether it was restored from the live build.

        A method that learns from the gallery keeps what the live build learned (so unchanged
        images keep their vectors), or, without a usable one, is fitted on the gallery's images.
        """
        base = self._base_method(spec)
        if not isinstance(base, LearnsFromGallery):
            return base, False
        build = live_build(method_dir)
        if build is not None:
            try:
                return base.load_state(build), True
            except LensError as exc:
                log.warning("%s: cannot reuse what the last build learned (%s); learning it again", spec, exc)
        return base.fit([self.root / item.path for item in items]), False

    def _cached_vectors(
        self, method_dir: Path, method: Method
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
        try:
            check_root(stored.manifest, self.root_id, method_dir, stored.folder)
        except IndexMismatchError:
            built_for = stored.manifest.get("gallery")
            # rows are reused only for files with the same path, size, times and inode: never another's
            log.warning("%s was built for the gallery '%s', not '%s': rebuilding it for '%s'",
                        method_dir, built_for, self.root_id, self.root_id)
        rows = {item: row for row, item in enumerate(stored.items)}
        return rows, np.asarray(stored.vectors), _given_spec(stored.manifest)

    # -- searching -------------------------------------------------------------------------------
    def open(self, spec: str) -> StoredIndex:
        """The live index of ``spec`` (opened once, re-opened when a newer build is published)."""
        return self._open(spec)[0]

    def _open(self, spec: str) -> tuple[StoredIndex, Method, Method]:
        """The live index of ``spec`` and the method to search it with (fitted to it if it learns).

        Re-opened when a newer build is published, or when the model was retrained since (the
        method cache then gives a new instance, checked against the index's manifest).
        """
        method_dir = self.method_dir(spec)
        if live_build(method_dir) is None:
            raise IndexNotFoundError(self._not_indexed(spec))
        base = self._base_method(spec)
        with self._lock:
            lock = self._open_locks.setdefault(spec, threading.Lock())
        # CURRENT is read once; a rebuild meanwhile cannot remove the build until it is open
        with lock, reading(method_dir) as build:
            if build is None:
                raise IndexNotFoundError(self._not_indexed(spec))
            entry = self._opened.get(spec)
            if entry is None or entry[0].folder != build or entry[2] is not base:
                method = base.load_state(build) if isinstance(base, LearnsFromGallery) else base
                entry = (open_build(method_dir, method.info, build=build, root=self.root_id), method, base)
                with self._lock:
                    self._opened[spec] = entry
            return entry

    def _not_indexed(self, spec: str) -> str:
        available = ", ".join(self.indexed_methods()) or "none yet"
        text = (f"no index for method '{spec}' in {self.index_dir} (indexed: {available}); build it "
                f"with `lens index {self.root} --methods {spec}`")
        legacy = Path("indexes") / self.name
        if self.index_dir == default_index_dir(self.root) and (legacy / method_slug(spec)).is_dir():
            text += (f". ({legacy} holds an index made by an older lens, which named index folders by "
                     f"the gallery's folder name only; if it is this gallery's, use it with --index-dir {legacy})")
        return text

    def search(
        self,
        image: ImageSource,
        method: str,
        k: int = 10,
        box: Box | None = None,
        rerank: Rerank = None,
    ) -> list[SearchResult]:
        """The ``k`` gallery images most similar to ``image`` (or to its ``box`` region), best first."""
        return self.search_many([image], method, k, [box], rerank=rerank)[0]

    def search_many(
        self,
        images: Sequence[ImageSource],
        method: str,
        k: int = 10,
        boxes: Sequence[Box | None] | None = None,
        rerank: Rerank = None,
    ) -> list[list[SearchResult]]:
        """Batched :meth:`search`: the query images are embedded together.

        ``rerank``: how many index candidates (at least ``k``) to re-rank, by the method's own check
        when it has one (SIFT: RANSAC-verified matches; scores are then inlier counts), else exactly
        with the stored vectors; ``"all"`` compares every gallery image (brute force, the exact
        reference); ``0`` keeps the index's order; ``None``: the method's default (SIFT: 50), else
        the index spec's ``rerank`` option (e.g. ``faiss:PQ32:rerank=100``), else 0.
        """
        boxes = list(boxes) if boxes is not None else [None] * len(images)
        stored, searcher, _ = self._open(method)
        pictures = [crop(load_image(image), box) for image, box in zip(images, boxes)]
        prepared = [searcher.prepare(picture) for picture in pictures]
        vectors = searcher.embed_prepared(prepared)
        count, kind = _rerank_count(rerank, stored, searcher), stored.index.metric
        if count >= len(stored.items):  # every image is a candidate: no index needed
            ids = np.tile(np.arange(len(stored.items), dtype=np.int64), (len(pictures), 1))
            scores = np.zeros(ids.shape, np.float32)
        else:
            ids, scores = stored.index.search(vectors, max(k, count))
        if count and isinstance(searcher, Reranks):
            # only the top `count` candidates are re-ranked; any results beyond them (k > count, e.g. a
            # full ranking for evaluation) keep the index's order and scores, and say so in their kind
            reranked = [searcher.rerank(item, row[:count], min(k, count)) for item, row in zip(prepared, ids)]
            tails = [(row_ids[count:k], row_scores[count:k]) for row_ids, row_scores in zip(ids, scores)]
            return self._on_disk([
                [SearchResult(rank + 1, stored.items[i].path, float(score), self.root / stored.items[i].path,
                              searcher.score_kind if rank < len(top_ids) else stored.index.metric)
                 for rank, (i, score) in enumerate(zip([*top_ids, *tail_ids], [*top_scores, *tail_scores]))
                 if i >= 0]
                for (top_ids, top_scores), (tail_ids, tail_scores) in zip(reranked, tails)
            ])
        elif count:
            index = stored.index
            ranked = list(zip(*rerank_exact(vectors, ids, stored.vectors, index.metric, index.dim, k)))
        else:
            ranked = [(row_ids[:k], row_scores[:k]) for row_ids, row_scores in zip(ids, scores)]
        return self._on_disk([
            [
                SearchResult(rank + 1, stored.items[i].path, float(score), self.root / stored.items[i].path,
                             kind)
                for rank, (i, score) in enumerate(zip(row_ids, row_scores))
                if i >= 0
            ]
            for row_ids, row_scores in ranked
        ])

    def _on_disk(self, groups: list[list[SearchResult]]) -> list[list[SearchResult]]:
        """``groups`` without the results whose file was deleted since the index was built (ranks
        renumbered), with a warning suggesting ``lens index``."""
        gone = {r.path for group in groups for r in group if not os.path.isfile(r.file)}
        if not gone:
            return groups
        example = display_path(sorted(gone)[0])
        log.warning("%d result file(s) were deleted since the index was built (e.g. %s) and are left out; "
                    "refresh the index with `lens index %s`", len(gone), example, self.root)
        return [[replace(r, rank=rank) for rank, r in enumerate((r for r in group if r.path not in gone), 1)]
                for group in groups]


def _given_spec(manifest: dict[str, Any]) -> str | None:
    """The index spec of a build when it was asked for (kept by later builds); None when it was a default."""
    given = manifest.get("build", {}).get("index_given")
    if given is None:  # builds before the size-based default: only plain "annoy" was a default
        given = manifest.get("index") != DEFAULT_INDEX
    return manifest.get("index") if given else None


def _rerank_count(rerank: Rerank, stored: StoredIndex, method: Method) -> int:
    """How many candidates to re-rank (>= the gallery's size: all of them)."""
    if rerank is None:
        rerank = method.candidates if isinstance(method, Reranks) else getattr(stored.index, "rerank", 0)
    if rerank == "all":
        return len(stored.items)
    if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 0:
        raise LensError(f"rerank must be a number of candidates (0 or more) or 'all', got {rerank!r}")
    return int(rerank)
