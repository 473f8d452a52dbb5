"""Everything the app does, as plain Python: the UI in app.py only calls this.

A :class:`LensService` serves one gallery with a set of methods. At start it opens the methods whose
indexes exist and builds the missing ones on a background thread, while already-built methods serve
queries. It detects objects (once per photo: results are cached), picks the main subject, searches
one method or compares them all, timing each search.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from lens.detect import DEFAULT_MARGIN, Box, box_at, create_detector, main_subject
from lens.errors import IndexMismatchError, IndexNotFoundError, LensError
from lens.gallery import Gallery, SearchResult
from lens.draw import draw_outline
from lens.images import MIN_REGION, display_path, fit_region, iter_image_files, load_image, region_around
from lens.search import AUTO, TEXT_WEIGHT, query_picture

log = logging.getLogger("lens")

THUMBNAIL_SIZE = 320

#: Boxes are detected once at this low threshold and filtered afterwards, so moving the threshold
#: slider never re-runs the detector.
DETECT_FLOOR = 0.05
#: Methods opened at once at start-up (2 cores: a model loads while another index's checksums run).
OPEN_THREADS = 2


def progress_text(done: int, total: int, seconds: float) -> str:
    """An index build's progress for people: ``indexing 320/3068 (10%) · 11.2 img/s · about 4 min left``.

    ``seconds``: wall time since the build started (what the user waited for, so the rate and the
    time left count decoding, fitting and embedding alike)."""
    text = f"indexing {done}/{total}" + (f" ({100 * done / total:.0f}%)" if total else "")
    if done <= 0 or seconds <= 0:
        return text
    rate = done / seconds
    left = (total - done) / rate
    eta = f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min" if left < 5400 else f"{left / 3600:.1f} h"
    return f"{text} · {rate:.1f} img/s · about {eta} left" if done < total else f"{text} · {rate:.1f} img/s"


@dataclass
class MethodState:
    """Where a served method stands."""

    name: str
    status: str  #: "ready", "queued", "building", "failed", "missing"
    detail: str = ""  #: progress or the reason it failed, for people


@dataclass
class Outcome:
    """One method's answer to one query."""

    method: str
    results: list[SearchResult] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


class LensService:
    """The app's state for one gallery: its served methods, their indexes and a detection cache.

    ``methods``: method specs to serve; ``detector`` / ``detector_weights``: see
    :func:`lens.detect.create_detector`; ``detect_cache_size``: photos whose boxes are remembered;
    ``index_spec``: the index backend missing indexes are built with (:func:`lens.index.create_index`,
    e.g. ``milvus:http://db:19530``; None: what :meth:`Gallery.index` chooses). A method whose index
    cannot be opened (an unreachable Milvus server) is ``failed`` with the reason; the others serve.
    Raises :class:`LensError` with no methods.
    """

    def __init__(
        self,
        gallery: Gallery,
        methods: Sequence[str],
        *,
        detector: str = "yolo",
        detector_weights: str | None = None,
        detect_cache_size: int = 64,
        index_spec: str | None = None,
    ):
        if not methods:
            raise LensError("no methods to serve")
        self.gallery = gallery
        self.methods = list(dict.fromkeys(methods))
        self.detector = detector
        self.detector_weights = detector_weights
        self.index_spec = index_spec
        self._states = {m: MethodState(m, "queued", "waiting to be opened") for m in self.methods}
        self._lock = threading.Lock()
        self._detections: OrderedDict[tuple, list[Box]] = OrderedDict()
        self._detect_cache_size = detect_cache_size
        self._worker: threading.Thread | None = None
        self.thumbnail_dir = gallery.index_dir / "thumbnails"

    # -- methods and their indexes ---------------------------------------------------------------
    def start(self, *, background: bool = True, build_missing: bool = True) -> None:
        """Open every method's index and build the missing ones (on a thread unless told otherwise)."""
        if background:
            self._worker = threading.Thread(target=self._prepare_all, args=(build_missing,),
                                            name="lens-build", daemon=True)
            self._worker.start()
        else:
            self._prepare_all(build_missing)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the start-up opening and building to end (at most ``timeout`` seconds)."""
        if self._worker is not None:
            self._worker.join(timeout)

    def _set(self, method: str, status: str, detail: str = "") -> None:
        with self._lock:
            self._states[method] = MethodState(method, status, detail)

    def _prepare_all(self, build_missing: bool) -> None:
        # existing indexes first, so they serve while others build; two at a time: loading one
        # model overlaps with verifying another index's checksums (both release the GIL)
        with ThreadPoolExecutor(max_workers=OPEN_THREADS, thread_name_prefix="lens-open") as pool:
            opened = list(pool.map(self._open_existing, self.methods))
        missing = [method for method, ok in zip(self.methods, opened) if not ok]
        for method in missing:
            if build_missing:
                self._set(method, "queued", "no index yet: waiting to be built")
            else:
                self._set(method, "missing",
                          f"no index: build it with `lens index {self.gallery.root} --methods {method}`")
        if build_missing and missing:
            self._build(missing)

    def _build(self, missing: list[str]) -> None:
        """Build the missing indexes one at a time, in the order their models finish loading.

        Every model loads at once on its own thread (a hub download waits on the network, not the
        CPU), so a method that needs no download (phash, sift) is built and serves at once instead
        of queueing behind one whose download is slow or, offline, fails only after the hub's retries.
        """
        for method in missing:
            self._set(method, "queued", "loading the model")
        with ThreadPoolExecutor(max_workers=len(missing), thread_name_prefix="lens-load") as pool:
            loads = {pool.submit(self.gallery.method, method): method for method in missing}
            for done in as_completed(loads):
                method = loads[done]
                try:
                    done.result()
                    self._set(method, "building", "preparing: reading the gallery (and fitting the method "
                                                  "to it, for methods that learn from it)")
                    started = time.perf_counter()
                    self.gallery.index(
                        [method], progress=False, index_spec=self.index_spec,
                        on_progress=lambda m, n, total: self._set(
                            m, "building", progress_text(n, total, time.perf_counter() - started)),
                    )
                    self._set(method, "ready", f"{len(self.gallery.open(method).items)} images")
                except Exception as exc:
                    log.warning("cannot build the %s index: %s", method, exc)
                    self._set(method, "failed", str(exc))

    def _open_existing(self, method: str) -> bool:
        """Open ``method``'s index if it has a usable one; False when it needs building."""
        try:
            self._set(method, "queued", "opening its index")
            self._set(method, "ready", f"{len(self.gallery.open(method).items)} images")
        except (IndexNotFoundError, IndexMismatchError) as exc:
            if isinstance(exc, IndexMismatchError):
                log.warning("%s", exc)
            return False
        except Exception as exc:  # a broken method must not stop the others
            self._set(method, "failed", str(exc))
        return True

    def states(self) -> list[MethodState]:
        """Each served method's state (ready, queued, building, failed, missing), in serving order."""
        with self._lock:
            return [self._states[m] for m in self.methods]

    def ready_methods(self) -> list[str]:
        """The methods that can be searched now."""
        return [s.name for s in self.states() if s.status == "ready"]

    def search_choices(self) -> list[str]:
        """What a search can use now: ``auto`` (the combined search: exact matches, then visually
        similar) first whenever a served method is ready, then each ready method."""
        ready = self.ready_methods()
        return [AUTO, *ready] if ready else []

    def gallery_size(self) -> int:
        """Images in the largest ready index (0 while none is ready)."""
        sizes = [len(self.gallery.open(m).items) for m in self.ready_methods()]
        return max(sizes, default=0)

    def check_k(self, k: float | int | str | None) -> int:
        """``k`` (results asked for) as an int: a whole number from 1 to the gallery's size (larger is
        cut to the size once an index is ready). Raises :class:`LensError` otherwise (0.1, 0, -3, "x")."""
        try:
            value = float(k)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            value = float("nan")
        size = self.gallery_size()
        if not (value >= 1 and value == int(value)):
            upper = f" to {size}" if size else " or more"
            raise LensError(f"the number of results (k) is a whole number from 1{upper}, got {k!r}")
        return min(int(value), size) if size else int(value)

    def example_photos(self, count: int = 6, look_at: int = 600) -> list[Path]:
        """A few photos of the gallery to try it with: ``count`` spread evenly over the first
        ``look_at`` image files found (sorted; a folder of any size is never walked in full)."""
        files = list(itertools.islice(iter_image_files(self.gallery.root), look_at))
        step = max(1, len(files) // count)
        return files[::step][:count]

    # -- detection -------------------------------------------------------------------------------
    def detect(self, image: Image.Image, detector: str | None = None, threshold: float = 0.25) -> list[Box]:
        """Objects in ``image`` scoring at least ``threshold``, best first (detector runs once per photo)."""
        name = detector or self.detector
        weights = self.detector_weights if name == self.detector else None
        key = (hashlib.sha1(image.tobytes()).hexdigest(), image.size, name, weights)
        with self._lock:
            boxes = self._detections.get(key)
            if boxes is not None:
                self._detections.move_to_end(key)
        if boxes is None:
            boxes = create_detector(name, weights, conf=DETECT_FLOOR).detect(image)
            with self._lock:
                self._detections[key] = boxes
                while len(self._detections) > self._detect_cache_size:
                    self._detections.popitem(last=False)
        return [box for box in boxes if box.score >= threshold]

    @staticmethod
    def main_subject_index(boxes: Sequence[Box], size: tuple[int, int]) -> int | None:
        """Position in ``boxes`` of the main subject (:func:`lens.detect.main_subject`) of a picture of
        ``size`` (width, height) pixels; None when there are no boxes."""
        subject = main_subject(list(boxes), size)
        return None if subject is None else list(boxes).index(subject)

    @staticmethod
    def box_at(boxes: Sequence[Box], x: float, y: float) -> int | None:
        """Position of the smallest box under the point (x, y) in pixels (a click); None if none."""
        return box_at(list(boxes), x, y)

    @staticmethod
    def subject_at(boxes: Sequence[Box], x: float, y: float, size: tuple[int, int]) -> tuple[int | None, Box]:
        """What a click at (x, y) pixels on a picture of ``size`` (width, height) chooses: the smallest
        detected box under it, as ``(its position in boxes, the box)``; outside every box, a region
        around the click (:func:`lens.images.region_around`), as ``(None, the region)``.
        Raises :class:`~lens.images.ImageError` for a point outside the picture."""
        hit = box_at(list(boxes), x, y)
        return (hit, boxes[hit]) if hit is not None else (None, region_around(x, y, size))

    @staticmethod
    def region(corners: Box | Sequence[float], size: tuple[int, int], min_side: float = MIN_REGION) -> Box:
        """A region the user drew or typed (two corners in any order, in pixels) made searchable on a
        picture of ``size``: :func:`lens.images.fit_region` (ordered, clamped, at least ``min_side``)."""
        return fit_region(corners, size, min_side)

    @staticmethod
    def subject_image(image: Image.Image, box: Box | None, margin: float = DEFAULT_MARGIN) -> Image.Image:
        """What a search looks for: ``image`` cropped once to ``box`` with ``margin`` of context
        (:func:`lens.images.crop`'s rule; 5% by default for a detector's box); ``None``: ``image`` itself.
        """
        return query_picture(image, box, margin)

    # -- search ----------------------------------------------------------------------------------
    def search(self, image: Image.Image | None, method: str, k: int = 10, box: Box | None = None, *,
               text: str | None = None, text_weight: float = TEXT_WEIGHT) -> Outcome:
        """The ``k`` most similar gallery images to ``image`` (or to its ``box``), timed.

        The subject is cropped once (:meth:`subject_image`) and searched as it is; except by the
        combined search ``auto`` and ``local``, which match the whole photo, the box focusing them
        (and cropping only for the visually similar part). ``text``: words to search for
        (``image=None``) or to refine the picture with (see :meth:`search_subject`).
        Raises :class:`LensError` when ``method`` is not served or not ready.
        """
        words = text.strip() if text and text.strip() else None
        if image is not None and words is None and method in (AUTO, "local"):
            self._check_ready(method)
            started = time.perf_counter()
            results = self.gallery.search(image, method, k=k, box=box, margin=DEFAULT_MARGIN)
            return Outcome(method, results, time.perf_counter() - started)
        subject = self.subject_image(image, box) if image is not None else None
        return self.search_subject(subject, method, k, text=words, text_weight=text_weight)

    def _check_ready(self, method: str) -> None:
        if method == AUTO:
            if not self.ready_methods():
                raise LensError("the combined search needs a ready method; none is ready yet")
            return
        state = next((s for s in self.states() if s.name == method), None)
        if state is None:
            raise LensError(f"method '{method}' is not served here; choose one of {', '.join(self.methods)}")
        if state.status != "ready":
            raise LensError(f"method '{method}' is not available yet: {state.status} ({state.detail})")

    def search_subject(self, subject: Image.Image | None, method: str, k: int = 10, *,
                       text: str | None = None, text_weight: float = TEXT_WEIGHT) -> Outcome:
        """The ``k`` gallery images most similar to ``subject`` (an already cropped picture), timed.

        With ``text`` (a method that reads words: ``clip``, ``siglip``): the words alone when
        ``subject`` is None, else the picture refined by them, ``text_weight`` being the words' share
        (:meth:`lens.Gallery.search`). Empty or blank ``text`` is no text.
        """
        text = text.strip() if text and text.strip() else None
        self._check_ready(method)
        started = time.perf_counter()
        words = {"text": text, "text_weight": text_weight} if text is not None else {}
        results = self.gallery.search(subject, method, k=k, **words)
        return Outcome(method, results, time.perf_counter() - started)

    def compare(self, image: Image.Image, k: int = 5, box: Box | None = None) -> list[Outcome]:
        """The same subject (cropped once) searched with every ready method: one outcome per method,
        a method's error kept in its outcome."""
        subject = self.subject_image(image, box)
        outcomes = []
        for method in self.ready_methods():
            try:
                outcomes.append(self.search_subject(subject, method, k))
            except LensError as exc:
                outcomes.append(Outcome(method, error=str(exc)))
        return outcomes

    # -- pictures for the UI ---------------------------------------------------------------------
    def original(self, result: SearchResult) -> Path:
        """The gallery file of a result (to open or download), only for indexed paths.

        ``result.path`` must be relative and stay inside the gallery folder by its own components (no
        ``..``). Raises :class:`LensError` otherwise, or when the file is gone since it was indexed.
        """
        relative = PurePosixPath(result.path)
        if relative.is_absolute() or ".." in relative.parts:
            raise LensError(f"refusing to show '{display_path(result.path)}': it is outside the gallery folder")
        source = self.gallery.root / relative
        try:
            source.stat()  # follows symlinks, as the scanner does
        except OSError:
            raise LensError(f"'{display_path(result.path)}' is no longer in the gallery (deleted since it was "
                            f"indexed); refresh the index with `lens index {display_path(self.gallery.root)}`") from None
        return source

    def openable(self, result: SearchResult) -> Path:
        """The file to hand the browser to open or download a result: the gallery file itself, or, for a
        linked file whose target lies outside the gallery folder, a copy of it (same name, made once,
        remade when the file changes) in the thumbnail folder: a web app serves files only from the
        folders it was given, and it checks where a link points.

        Raises :class:`LensError` as :meth:`original` does.
        """
        source = self.original(result)
        if source.resolve().is_relative_to(self.gallery.root.resolve()):
            return source
        target = self.thumbnail_dir / "originals" / _file_key(source) / source.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{os.getpid()}.{threading.get_ident()}.tmp")
            shutil.copyfile(source, partial)
            os.replace(partial, target)
        return target

    def thumbnail(self, result: SearchResult) -> Path:
        """A small JPEG of a result (made once, remade when the file changes), only for indexed paths;
        an exact match's region (the query's outline in it) is drawn on it.

        ``result.path`` must be relative and stay inside the gallery folder by its own components (no
        ``..``): the folders the scanner follows (linked folders included) are shown, nothing else.
        File names are OS paths throughout (names that are not valid UTF-8 included).
        """
        source = self.original(result)
        target = self.thumbnail_dir / f"{_file_key(source, str(result.region))}.jpg"
        if not target.exists():
            image = load_image(source, name=display_path(result.path))
            width = image.width
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            if result.region:
                scale = image.width / width
                image = draw_outline(image, [(x * scale, y * scale) for x, y in result.region])
            self.thumbnail_dir.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            image.save(partial, "JPEG", quality=85)
            os.replace(partial, target)
        return target


def _file_key(source: Path, extra: str = "") -> str:
    """A name for what is made from ``source`` (20 hex digits): it changes when the file, its content
    (size, times, inode) or ``extra`` changes."""
    stat = source.stat()
    identity = b"%s:%d:%d:%d:%d:%s" % (os.fsencode(source.resolve()), stat.st_size, stat.st_mtime_ns,
                                        stat.st_ctime_ns, stat.st_ino, extra.encode())
    return hashlib.sha1(identity).hexdigest()[:20]
