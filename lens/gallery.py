"""A folder of images and its per-method indexes: build them, keep them fresh, search them.

    >>> from lens import Gallery
    >>> gallery = Gallery("photos/")                      # indexes in ./indexes/photos/
    >>> gallery.index(["resnet50", "vit"])                 # embeds only new or changed files
    >>> gallery.search("query.jpg", method="vit", k=10, box=(10, 20, 200, 240))

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
from typing import Any

import numpy as np
from filelock import FileLock

from lens.embedding import embed_files
from lens.errors import CorruptIndexError, IndexNotFoundError, LensError
from lens.images import ImageSource, crop, iter_image_files, load_image
from lens.index import DEFAULT_INDEX, create_index
from lens.methods import Method, create_method, is_trained, method_slug
from lens.store import Item, StoredIndex, check_compatible, live_build, open_build, publish, read_manifest

log = logging.getLogger("lens")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class SearchResult:
    rank: int  #: 1 = best
    path: str  #: the image's path relative to the gallery root (its id)
    score: float  #: similarity in [0, 1], 1 = identical
    file: Path  #: where the image is on disk

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "path": str(self.file), "score": round(self.score, 6)}


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
        self._opened: dict[str, StoredIndex] = {}
        self._lock = threading.Lock()

    # -- methods and their folders ---------------------------------------------------------------
    def method(self, spec: str) -> Method:
        """The loaded method ``spec``, with this gallery's model override if any (cached per process)."""
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
        batch_size: int = 32,
        workers: int = 2,
        progress: bool = True,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> list[IndexReport]:
        """Build or refresh the index of every method; only new or changed images are embedded.

        ``progress`` shows a progress bar; ``on_progress(method, done, total)`` reports each batch.
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
        batch_size: int,
        workers: int,
        progress: bool,
        on_progress: Callable[[str, int, int], None] | None,
    ) -> IndexReport:
        started = time.perf_counter()
        method = self.method(spec)
        info = method.info
        method_dir = self.method_dir(spec)
        method_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(method_dir / ".lock")):
            cached, previous_spec = self._cached_vectors(method_dir, method)
            fresh = [item for item in items if item not in cached]
            embed_started = time.perf_counter()
            embedded = embed_files(
                method, [self.root / item.path for item in fresh],
                batch_size=batch_size, workers=workers, progress=progress, desc=spec,
                on_progress=(lambda done, total: on_progress(spec, done, total)) if on_progress else None,
            )
            embed_seconds = time.perf_counter() - embed_started
            by_path = {item.path: item for item in fresh}
            new_rows = {
                path.relative_to(self.root).as_posix(): row for row, path in enumerate(embedded.paths)
            }
            kept: list[Item] = []
            rows: list[np.ndarray] = []
            for item in items:
                if item in cached:
                    kept.append(item)
                    rows.append(cached[item])
                elif item.path in new_rows:
                    kept.append(by_path[item.path])
                    rows.append(embedded.vectors[new_rows[item.path]])
            if not kept:
                raise LensError(f"none of the {len(items)} images in '{self.root}' could be read")
            vectors = np.stack(rows).astype(embedded.vectors.dtype if len(embedded.vectors) else rows[0].dtype)
            index = create_index(index_spec or previous_spec or DEFAULT_INDEX, info.dim, info.metric)
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
                },
            )
        return IndexReport(
            spec, folder, len(kept), len(embedded.paths), len(kept) - len(embedded.paths),
            time.perf_counter() - started, embed_seconds, skipped,
        )

    def _cached_vectors(self, method_dir: Path, method: Method) -> tuple[dict[Item, np.ndarray], str | None]:
        """Embeddings of the live build, reusable when it was built with the same weights."""
        try:
            manifest = read_manifest(method_dir)
            if manifest is None:
                return {}, None
            if (manifest.get("weights"), manifest.get("dim")) != (method.info.weights, method.info.dim):
                log.warning("%s: model changed since the last build; embedding every image again",
                            method.info.name)
                return {}, manifest.get("index")
            stored = open_build(method_dir, method.info, verify=True)
        except (LensError, KeyError) as exc:
            log.warning("%s: previous index unusable (%s); embedding every image again", method_dir, exc)
            return {}, None
        vectors = np.asarray(stored.vectors)
        return {item: vectors[row] for row, item in enumerate(stored.items)}, stored.manifest["index"]

    # -- searching -------------------------------------------------------------------------------
    def open(self, spec: str) -> StoredIndex:
        """The live index of ``spec`` (opened once, re-opened when a newer build is published)."""
        build = live_build(self.method_dir(spec))
        if build is None:
            available = ", ".join(self.indexed_methods()) or "none yet"
            raise IndexNotFoundError(
                f"no index for method '{spec}' in {self.index_dir} (indexed: {available}); build it "
                f"with `lens index {self.root} --methods {spec}`"
            )
        info = self.method(spec).info
        with self._lock:
            stored = self._opened.get(spec)
            if stored is None or stored.folder != build:
                stored = open_build(self.method_dir(spec), info)
                self._opened[spec] = stored
            else:
                check_compatible(stored.manifest, info, stored.folder)  # the model may have been retrained
            return stored

    def search(
        self, image: ImageSource, method: str, k: int = 10, box: Box | None = None
    ) -> list[SearchResult]:
        """The ``k`` gallery images most similar to ``image`` (or to its ``box`` region), best first."""
        return self.search_many([image], method, k, [box])[0]

    def search_many(
        self,
        images: Sequence[ImageSource],
        method: str,
        k: int = 10,
        boxes: Sequence[Box | None] | None = None,
    ) -> list[list[SearchResult]]:
        """Batched :meth:`search`: the query images are embedded together."""
        boxes = list(boxes) if boxes is not None else [None] * len(images)
        stored = self.open(method)
        pictures = [crop(load_image(image), box) for image, box in zip(images, boxes)]
        vectors = self.method(method).embed(pictures)
        ids, scores = stored.index.search(vectors, k)
        return [
            [
                SearchResult(rank + 1, stored.items[i].path, float(score), self.root / stored.items[i].path)
                for rank, (i, score) in enumerate(zip(row_ids, row_scores))
                if i >= 0
            ]
            for row_ids, row_scores in zip(ids, scores)
        ]
