"""A folder of images and its per-method indexes: build them, keep them fresh, search them.

    >>> from lens import Gallery
    >>> gallery = Gallery("photos/")                      # indexes in ./indexes/photos/
    >>> gallery.index(["resnet50", "vit"])                 # embeds only new or changed files
    >>> gallery.search("query.jpg", method="vit", k=10, box=(10, 20, 200, 240))
    >>> gallery.search("query.jpg", method="sift", k=10, rerank="all")   # brute-force matching

Trained methods (``autoencoder``, ``siamese``, ``finetune``) use the model ``lens train`` wrote for this
gallery, ``models/<gallery folder name>/<method>/``, unless ``models=`` or ``models_dir=`` says otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from filelock import FileLock

from lens.embedding import default_batch_size, embed_files
from lens.errors import CorruptIndexError, IndexNotFoundError, LensError
from lens.exact import AUTO, auto_methods, combine
from lens.images import ImageSource, crop, iter_image_files, load_image
from lens.index import DEFAULT_INDEX, create_index, default_index, rerank_exact
from lens.methods import Method, create_method, is_trained, method_slug
from lens.methods.base import LearnsFromGallery, MatchesLocally, Reranks
from lens.store import Item, StoredIndex, live_build, open_build, publish, read_manifest

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
    #: ``exact``: the same item, verified geometrically (RANSAC homography); ``similar``: anything else
    match: str = "similar"
    inliers: int = 0  #: verified keypoint matches (exact matches only)
    #: exact matches: the query's outline in this image, 4 (x, y) corners in its pixels
    region: tuple[tuple[float, float], ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        data = {"rank": self.rank, "path": str(self.file), "score": round(self.score, 6),
                "score_kind": self.kind, "match": self.match}
        if self.match == "exact":
            data["inliers"] = self.inliers
            data["region"] = [[round(x, 1), round(y, 1)] for x, y in self.region or ()]
        return data

    @property
    def score_text(self) -> str:
        if self.kind == "inliers":
            return f"{self.score:.0f} inliers"
        return f"{self.score:.3f}"


#: What each kind of score means, for people.
SCORE_LABELS = {
    "cosine": "cosine similarity, 1 = identical",
    "hamming": "1 - Hamming distance / bits, 1 = identical",
    "inliers": "RANSAC-verified keypoint matches (inliers), more = more alike",
    "votes": "inverted-file votes of shared visual words (unverified), more = more alike",
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


class Gallery:
    """A folder of images (searched recursively) and where its indexes live."""

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
        self.index_dir = Path(index_dir) if index_dir else Path("indexes") / self.name
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
    def scan(self) -> list[Item]:
        """Every image file below the root (the index folder excluded), with what identifies its version."""
        items = []
        for path in iter_image_files(self.root, exclude=(self.index_dir,)):
            stat = path.stat()
            items.append(Item(path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime_ns))
        return items

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
        items = self.scan()
        if not items:
            raise LensError(f"no images found in '{self.root}' (looked for jpg, png, webp, bmp, tiff, gif)")
        return [
            self._index_one(spec, items, index_spec, batch_size, workers, progress, on_progress)
            for spec in methods
        ]

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
        build = live_build(method_dir)
        if build is None:
            available = ", ".join(self.indexed_methods()) or "none yet"
            raise IndexNotFoundError(
                f"no index for method '{spec}' in {self.index_dir} (indexed: {available}); build it "
                f"with `lens index {self.root} --methods {spec}`"
            )
        base = self._base_method(spec)
        with self._lock:
            lock = self._open_locks.setdefault(spec, threading.Lock())
        with lock:
            entry = self._opened.get(spec)
            if entry is None or entry[0].folder != build or entry[2] is not base:
                method = base.load_state(build) if isinstance(base, LearnsFromGallery) else base
                entry = (open_build(method_dir, method.info), method, base)
                with self._lock:
                    self._opened[spec] = entry
            return entry

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
        if method == AUTO:
            return [self._search_auto(image, box, k, rerank) for image, box in zip(images, boxes)]
        stored, searcher, _ = self._open(method)
        if isinstance(searcher, MatchesLocally):
            return [self._match(stored, searcher, image, box, k) for image, box in zip(images, boxes)]
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
            return [
                [SearchResult(rank + 1, stored.items[i].path, float(score), self.root / stored.items[i].path,
                              searcher.score_kind if rank < len(top_ids) else stored.index.metric)
                 for rank, (i, score) in enumerate(zip([*top_ids, *tail_ids], [*top_scores, *tail_scores]))
                 if i >= 0]
                for (top_ids, top_scores), (tail_ids, tail_scores) in zip(reranked, tails)
            ]
        elif count:
            index = stored.index
            ranked = list(zip(*rerank_exact(vectors, ids, stored.vectors, index.metric, index.dim, k)))
        else:
            ranked = [(row_ids[:k], row_scores[:k]) for row_ids, row_scores in zip(ids, scores)]
        return [
            [
                SearchResult(rank + 1, stored.items[i].path, float(score), self.root / stored.items[i].path,
                             kind)
                for rank, (i, score) in enumerate(zip(row_ids, row_scores))
                if i >= 0
            ]
            for row_ids, row_scores in ranked
        ]


    def _search_auto(self, image: ImageSource, box: Box | None, k: int, rerank: Rerank) -> list[SearchResult]:
        """The combined search (:mod:`lens.exact`): exact matches, then visually similar images."""
        exact_method, similar_method = auto_methods(self.indexed_methods())
        picture = load_image(image)
        exact = self.search_many([picture], exact_method, k, [box])[0] if exact_method else []
        verified = sum(r.match == "exact" for r in exact)
        similar = (self.search_many([picture], similar_method, k + verified, [box], rerank=rerank)[0]
                   if similar_method else [])
        return combine(exact, similar, k)

    def _match(self, stored: StoredIndex, searcher: MatchesLocally, image: ImageSource, box: Box | None,
               k: int) -> list[SearchResult]:
        """Results of a method with its own index: the whole photo is matched, the box only focuses."""
        picture = load_image(image)
        found = searcher.match(searcher.prepare(picture), k, box)  # type: ignore[attr-defined]
        results = []
        for rank, m in enumerate(found):
            item = stored.items[m.row]
            exact = m.inliers > 0
            region = tuple((float(x), float(y)) for x, y in m.region) if m.region is not None else None
            results.append(SearchResult(rank + 1, item.path, float(m.inliers if exact else m.votes),
                                        self.root / item.path, "inliers" if exact else "votes",
                                        "exact" if exact else "similar", m.inliers, region))
        return results


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
