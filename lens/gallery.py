"""A folder of images and its per-method indexes: the public front over indexing and search.

    >>> from lens import Gallery
    >>> gallery = Gallery("photos/")                      # indexes in ./indexes/photos-<hash of its path>/
    >>> gallery.index(["resnet50", "vit"])                 # embeds only new or changed files
    >>> gallery.search("query.jpg", method="vit", k=10, box=(10, 20, 200, 240))
    >>> gallery.search("query.jpg", method="sift", k=10, rerank="all")   # brute-force matching
    >>> gallery.search(None, method="clip", text="a red dress")            # words (a clip index)
    >>> gallery.search("query.jpg", method="clip", text="in red", text_weight=0.5)  # photo + words

A :class:`Gallery` resolves method specs and model overrides, and keeps each method's live index
open (re-opened when a newer build is published); :mod:`lens.indexing` builds the indexes and
:mod:`lens.search` is the query path.

Trained methods (``autoencoder``, ``siamese``, ``finetune``) use the model ``lens train`` wrote for this
gallery, ``models/<folder name>-<hash of its path>/<method>/`` (:func:`default_models_dir`), unless
``models=`` or ``models_dir=`` says otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lens.distributed import RayCluster, embeds_on_ray
from lens.embedding import embed_files
from lens.errors import CorruptIndexError, IndexNotFoundError, LensError, ModelLoadError
from lens.images import IMAGE_EXTENSIONS, ImageSource, load_image
from lens.indexing import IndexReport, build_index, scan, scan_files
from lens.methods import Method, check_spec, create_method, is_trained, method_slug
from lens.search import (AUTO, TEXT_WEIGHT, auto_methods, combine, match_picture, query_picture, search_pictures,
                         search_text)
from lens.store import Item, StoredIndex, live_build, open_build, read_manifest, reading
from lens.types import SCORE_LABELS, Box, EmbedsText, LearnsFromGallery, MatchesLocally, Region, Rerank, SearchResult

__all__ = ["SCORE_LABELS", "Gallery", "IndexReport", "SearchResult"]

log = logging.getLogger("lens")


def gallery_key(root: str | Path) -> str:
    """``<folder name>-<8 hex digits of a sha256 of its path>``: one name per gallery root, so that two
    galleries with the same folder name (``2023/photos``, ``2024/photos``) never share an index or a
    trained model.

    The path hashed is the resolved root relative to the working directory when it lies below it
    (so a repository checked out elsewhere, e.g. a Space, finds its prebuilt ``indexes/`` and
    ``models/``), else the resolved absolute path.
    """
    resolved, here = Path(root).resolve(), Path.cwd().resolve()
    key = resolved.relative_to(here) if resolved.is_relative_to(here) else resolved
    digest = hashlib.sha256(os.fsencode(key.as_posix())).hexdigest()[:8]
    return f"{resolved.name or 'root'}-{digest}"


def default_index_dir(root: str | Path) -> Path:
    """``indexes/<folder name>-<hash of its path>`` (:func:`gallery_key`), relative to the working directory."""
    return Path("indexes") / gallery_key(root)


def default_models_dir(root: str | Path) -> Path:
    """``models/<folder name>-<hash of its path>`` (:func:`gallery_key`), relative to the working
    directory: where ``lens train`` writes a gallery's trained models, one folder per method."""
    return Path("models") / gallery_key(root)


class Gallery:
    """A folder of images (searched recursively) and where its indexes live.

    ``index_dir`` defaults to :func:`default_index_dir` (relative to the working directory); every
    build records the resolved root it indexes, and an index built for another root is refused for
    searching (:class:`~lens.errors.IndexMismatchError`) and rebuilt by :meth:`index`.

    ``files`` (optional) makes the gallery an explicit list instead: {id: file}, each file once, ids
    chosen by the caller (usually paths relative to ``root``; a file may lie outside ``root``). Exactly
    those files are indexed and nothing is scanned (``lens eval``: a dataset's gallery plus distractors).
    ``learn_from`` (optional): the ids that methods learning from the gallery (SIFT's vocabulary) are
    fitted on; default every image.
    """

    def __init__(
        self,
        root: str | Path,
        index_dir: str | Path | None = None,
        *,
        models: Mapping[str, str] | None = None,
        models_dir: str | Path | None = None,
        files: Mapping[str, str | Path] | None = None,
        learn_from: Iterable[str] | None = None,
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
        self.models_dir = Path(models_dir) if models_dir else default_models_dir(self.root)
        #: the explicit gallery, id -> file; None: every image below ``root``, id = its relative path
        self.files = {str(key): Path(file) for key, file in files.items()} if files is not None else None
        self.learn_from = set(learn_from) if learn_from is not None else None
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
        try:
            return create_method(spec, model=self.model_for(spec))
        except ModelLoadError as exc:
            legacy = Path("models") / self.name / method_slug(spec)
            if spec in self.models or self.models_dir != default_models_dir(self.root) or not legacy.is_dir():
                raise
            raise ModelLoadError(
                f"{exc}. ({legacy} holds a model trained by an older lens, which named model folders by the "
                f"gallery's folder name only; if it was trained on this gallery, use it with --model {spec}={legacy} "
                f"or move it to {self.models_dir / method_slug(spec)})") from exc

    def model_for(self, spec: str) -> str | None:
        """The model ``spec`` uses here: the override, this gallery's trained model, or None (its default)."""
        model = self.models.get(spec)
        if model is None and is_trained(spec):
            model = str(self.models_dir / method_slug(spec))
        return model

    def method_dir(self, spec: str) -> Path:
        """The folder of ``spec``'s index builds: ``<index_dir>/<method slug>``."""
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
        """The live build's manifest of ``spec`` (see :mod:`lens.store`), or None before the first build."""
        return read_manifest(self.method_dir(spec))

    def file(self, path: str) -> Path:
        """Where the gallery image with id ``path`` is on disk."""
        if self.files is not None and path in self.files:
            return self.files[path]
        return self.root / path

    # -- indexing --------------------------------------------------------------------------------
    def scan(self, skipped: list[tuple[str, str]] | None = None) -> list[Item]:
        """Every image file below the root (the index folder excluded): see :func:`lens.indexing.scan`;
        links that cannot be followed are appended to ``skipped`` as (path, reason).

        For an explicit gallery (``files=``): exactly its files, in the order given.
        """
        if self.files is not None:
            return scan_files(self.files)
        return scan(self.root, exclude=(self.index_dir,), skipped=skipped)

    def index(
        self,
        methods: Iterable[str],
        *,
        index_spec: str | None = None,
        batch_size: int | None = None,
        workers: int = 2,
        progress: bool = True,
        on_progress: Callable[[str, int, int], None] | None = None,
        ray: RayCluster | None = None,
        failed: list[tuple[str, str]] | None = None,
    ) -> list[IndexReport]:
        """Build or refresh the index of every method; only new or changed images are embedded.

        ``failed``: when given, a method that cannot be built (:class:`LensError`: its model cannot
        be loaded, too few images to learn from, ...) is appended as ``(spec, message)`` and the other
        methods are still built; without it the first such error is raised. Unknown method names
        are refused before anything is built.

        ``progress`` shows a progress bar; ``on_progress(method, done, total)`` reports each batch.
        ``batch_size`` (images per model call) defaults to 8 on CPU and 32 on a GPU. ``ray``: embed
        on this Ray cluster (:mod:`lens.distributed`; started on first use, left running) instead
        of in this process; a method that learns from the gallery (sift, local) is still built
        here, with a warning. The index, its manifest and publishing are the same either way.
        """
        scan_skipped: list[tuple[str, str]] = []
        items = self.scan(scan_skipped)
        if not items:
            raise LensError(f"no images found in '{self.root}' (looked for {len(IMAGE_EXTENSIONS)} image file "
                            "extensions: .jpg, .png, .webp, .avif, .heic, .tif, .bmp, .gif, ...; see the README)")
        methods = list(methods)
        for spec in methods:
            check_spec(spec)
        reports = []
        for spec in methods:
            try:
                reports.append(self._index_one(spec, items, scan_skipped, index_spec=index_spec,
                                               batch_size=batch_size, workers=workers, progress=progress,
                                               on_progress=on_progress, ray=ray))
            except LensError as exc:
                if failed is None:
                    raise
                failed.append((spec, str(exc)))
        return reports

    def _index_one(self, spec: str, items: list[Item], scan_skipped: list[tuple[str, str]], *,
                   index_spec: str | None, batch_size: int | None, workers: int, progress: bool,
                   on_progress: Callable[[str, int, int], None] | None, ray: RayCluster | None) -> IndexReport:
        """Build or refresh one method's index (see :meth:`index`)."""
        base = self._base_method(spec)
        embed = embed_files
        if ray is not None and embeds_on_ray(base):
            embed = ray.embedder(spec, self.model_for(spec))
        elif ray is not None:
            log.warning("%s: learns a vocabulary from the gallery, so it is not embedded on Ray "
                        "(--ray runs methods that embed each image on its own: hf, resnet50, vit, clip, "
                        "phash, ...); building it in this process", spec)
        report = build_index(self.root, self.method_dir(spec), spec, base, items,
                             index_spec=index_spec, batch_size=batch_size, workers=workers,
                             progress=progress, on_progress=on_progress, gallery_root=self.root_id,
                             files=self.files, learn_from=self.learn_from, embed=embed)
        report.skipped[:0] = scan_skipped
        return report

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
            check_spec(spec)  # a mistyped name is "unknown method", not "index it"
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
        image: ImageSource | None,
        method: str,
        k: int = 10,
        box: Region = None,
        rerank: Rerank = None,
        *,
        margin: float = 0.0,
        text: str | None = None,
        text_weight: float = TEXT_WEIGHT,
    ) -> list[SearchResult]:
        """The ``k`` gallery images most similar to ``image`` (or to its ``box`` region), best first.

        ``method``: an indexed method's spec, or ``auto``: the combined search (exact matches of
        ``local`` first, then a global embedding's visually similar images; see :mod:`lens.search`).
        A method with its own index (``local``) matches the whole photo; the box only focuses it.

        ``image``: a path, bytes, PIL image or HxWxC uint8 array, decoded once. ``box``: a
        :class:`~lens.types.Box` (e.g. a detector's) or ``(x1, y1, x2, y2)`` in pixels, cropped once
        with ``margin`` x its width / height of context on each side (:func:`lens.images.crop`; 0: the
        exact region). ``rerank``: see :meth:`search_many`. Raises :class:`IndexNotFoundError` when
        ``method`` has no index here, :class:`~lens.images.ImageError` for an unreadable image or a
        box with no area inside it.

        ``text``: words to search for (``image=None``) or to refine the picture with ("in red"), for a
        method that embeds text (``clip``, ``siglip``); ``text_weight`` in [0, 1] is the words' share of
        the query (:func:`lens.search.compose_query`). Their scores are of kind ``text cosine`` /
        ``image+text cosine``: another scale than image-to-image cosines.
        """
        if text is not None:
            if method == AUTO:  # words: the first indexed method that reads them
                method = self._text_method()
            stored, searcher, _ = self._open(method)
            picture = query_picture(image, box, margin) if image is not None else None
            return search_text(stored, searcher, text, picture, self.root, k, text_weight, rerank, files=self.files)
        if image is None:
            raise LensError("nothing to search for: give a photo, words (text=...), or both")
        return self.search_many([image], method, k, [box], rerank=rerank, margin=margin)[0]

    def _text_method(self) -> str:
        """The first indexed method that embeds words (``clip``, ``siglip``), for ``auto`` with text."""
        for spec in self.indexed_methods():
            if isinstance(self._base_method(spec), EmbedsText):
                return spec
        raise LensError("searching with words needs a method that reads them: index the gallery with "
                        f"`lens index {self.root} --methods clip` (or siglip)")

    def search_many(
        self,
        images: Sequence[ImageSource],
        method: str,
        k: int = 10,
        boxes: Sequence[Region] | None = None,
        rerank: Rerank = None,
        *,
        margin: float = 0.0,
    ) -> list[list[SearchResult]]:
        """Batched :meth:`search`: the query pictures are embedded together (one list per image).

        ``rerank``: how many index candidates (at least ``k``) to re-rank (see
        :func:`lens.search.search_pictures`): a number, ``"all"`` (brute force), ``0`` (the index's
        order) or ``None`` (the method's or index spec's default).
        """
        boxes = list(boxes) if boxes is not None else [None] * len(images)
        if not images:
            return []
        if method == AUTO:
            return self._search_auto(images, boxes, k, rerank, margin)
        stored, searcher, _ = self._open(method)
        if isinstance(searcher, MatchesLocally):  # the whole photo: the box only focuses
            return [match_picture(stored, searcher, load_image(image), Box.of(box) if box is not None else None,
                                  self.root, k, files=self.files) for image, box in zip(images, boxes)]
        pictures = [query_picture(image, box, margin) for image, box in zip(images, boxes)]
        return search_pictures(stored, searcher, pictures, self.root, k, rerank, files=self.files)

    def _search_auto(self, images: Sequence[ImageSource], boxes: Sequence[Region], k: int, rerank: Rerank,
                     margin: float) -> list[list[SearchResult]]:
        """The combined search (:func:`lens.search.combine`) of each image: exact matches, then
        visually similar ones (all the images embedded in one batch)."""
        exact_method, similar_method = auto_methods(self.indexed_methods())
        pictures = [load_image(image) for image in images]  # decoded once for both
        exact = self.search_many(pictures, exact_method, k, boxes) if exact_method else [[] for _ in pictures]
        verified = max((sum(r.match == "exact" for r in found) for found in exact), default=0)
        similar = (self.search_many(pictures, similar_method, k + verified, boxes, rerank, margin=margin)
                   if similar_method else [[] for _ in pictures])
        return [combine(found, alike, k) for found, alike in zip(exact, similar)]
