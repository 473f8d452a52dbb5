"""``lens eval``: every method measured the same way on one labelled dataset.

For each method: build (or refresh) its index over exactly the dataset's gallery (plus any
distractors: extra images relevant to no query), run every query through the public search path
exactly as a user's query runs (one query at a time, ``k = 10``, timed), rank the whole gallery for it
(untimed) and score the rankings (see :mod:`lens.evaluation.metrics` for the conventions). Approximate
indexes are also compared with exact search over the stored vectors (recall@10).

Memory stays bounded whatever the gallery's size: gallery images are decoded batch by batch while
indexing, and each query is decoded when it is searched; no decoded image is kept.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lens.errors import LensError
from lens.evaluation.datasets import Dataset
from lens.evaluation.metrics import average_precision, hit_at_k, mean_or_nan
from lens.gallery import SCORE_LABELS, Gallery
from lens.images import ImageError, check_box, crop, load_image
from lens.types import LearnsFromGallery, Region, Reranks

log = logging.getLogger("lens")
RECALL_KS = (1, 5, 10)
SEARCH_K = 10  #: results per timed query (what a user asks for)
SAMPLE_DEPTH = 10  #: gallery ids kept per ranking, for the report's sample pictures
_EMBED_BATCH = 16  #: queries decoded and embedded together for the ANN recall check


@dataclass(frozen=True)
class Query:
    """A query photo, and the region of it that is searched (its detected main subject, or all of it)."""

    path: Path
    box: Region = None  #: a Box or (x1, y1, x2, y2) in pixels; None: the whole photo
    margin: float = 0.0  #: context around ``box``, times its width / height (:func:`lens.images.crop`)

    def picture(self) -> Image.Image:
        """The decoded query (cropped to ``box``); decoded afresh on every call, never kept."""
        return crop(load_image(self.path), self.box, self.margin)


@dataclass
class Ranking:
    """One query's ranking of the whole gallery as scored, best first (the query itself left out)."""

    query: str  #: the query's file
    ids: list[str]  #: the first SAMPLE_DEPTH gallery ids
    labels: list[str]  #: their scores as shown to a user (e.g. "0.912", "37 inliers")
    scores: np.ndarray  #: float64, one per ranked gallery image (ties matter for AP)
    relevant: np.ndarray  #: bool, one per ranked gallery image
    n_relevant: int
    seconds: float  #: the timed search (k = SEARCH_K)


@dataclass
class MethodResult:
    """One method's figures on one dataset, as ``results.json`` and the report show them.

    ``map`` and ``recall[k]`` (R@k, k in :data:`RECALL_KS`) are in [0, 1] (conventions:
    :mod:`lens.evaluation.metrics`); times are milliseconds (``query_ms_*``, ``embed_ms_per_image``) or
    seconds (``build_seconds``); sizes are bytes. ``error`` is set (and the figures are NaN) when the method
    failed: the run goes on with the next method.
    """

    method: str
    map: float
    recall: dict[int, float]
    queries_scored: int  #: queries with at least one relevant item (the ones in the mean)
    queries_without_relevant: int
    query_ms_p50: float
    query_ms_p95: float
    embed_ms_per_image: float  #: batched, while building the index
    build_seconds: float
    index_bytes: int  #: the search index's own files
    stored_bytes: int  #: everything in the build (index + vectors + items + side data)
    index_spec: str | None  #: the vector index's spec; None for a method with its own index (``local``)
    ann_recall_at_10: float | None  #: approximate index vs exact search; None when not applicable
    model: str
    weights: str
    score_kind: str
    data_seen: str  #: what the method learnt from, if anything
    error: str | None = None
    rankings: list[Ranking] = field(default_factory=list, repr=False)

    @classmethod
    def failed(cls, method: str, error: str) -> MethodResult:
        """The result of a method that could not be evaluated: ``error`` says why, every figure is NaN or empty."""
        nan = float("nan")
        return cls(method, nan, {}, 0, 0, nan, nan, nan, 0.0, 0, 0, "", None, "", "", "", "", error=error)

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields for ``results.json`` (every field but the per-query ``rankings``)."""
        data = asdict(self)
        data.pop("rankings")
        return data


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def load_queries(dataset: Dataset, detect: Callable[[Image.Image], Region] | None = None,
                 margin: float = 0.0, skipped: list[tuple[Path, str]] | None = None) -> list[Query]:
    """The dataset's usable queries, in order.

    ``detect(picture)`` gives the region to search (the main subject, a :class:`~lens.types.Box` or
    ``(x1, y1, x2, y2)`` in pixels; None: the whole photo), cropped with ``margin`` (a fraction of its
    width / height, :func:`lens.images.crop`); it runs once per query here. Each query is decoded to
    check it, then let go.

    One bad query never stops an evaluation: a query that cannot be decoded, or whose detected region
    cannot be searched (not 4 finite numbers, no area, or outside the photo: :func:`lens.images.check_box`),
    is skipped with a warning and appended to ``skipped`` as (file, reason). Raises :class:`LensError`
    for a negative ``margin`` (it would refuse every query).
    """
    if not margin >= 0:
        raise LensError(f"the crop margin must be 0 or more, got {margin}")
    queries = []

    def skip(path: Path, reason: str) -> None:
        log.warning("query skipped: %s", reason)
        if skipped is not None:
            skipped.append((path, reason))

    for path in dataset.queries:
        try:
            picture = load_image(path)
        except ImageError as exc:
            skip(path, str(exc))
            continue
        box = detect(picture) if detect else None
        try:
            if box is not None:
                check_box(box, picture.size)
        except ImageError as exc:
            skip(path, f"{path}: the detected region cannot be searched: {exc}")
            continue
        queries.append(Query(path, box, margin))
    return queries


def eval_gallery(dataset: Dataset, work: Path, *, distractors: Mapping[str, Path] | None = None,
                 models: Mapping[str, str] | None = None) -> Gallery:
    """The gallery ``lens eval`` indexes: exactly the dataset's gallery images, plus ``distractors``.

    Its ids are the dataset's gallery ids (paths relative to its images folder) and the distractors'
    ids (:func:`lens.evaluation.datasets.distractor_files`). Methods that learn from the gallery (SIFT's
    vocabulary) learn from the dataset's gallery only, never from queries or distractors. Indexes go
    to ``work/indexes``, trained models to ``work/models``.
    """
    files = {image: dataset.gallery_root / image for image in dataset.gallery}
    files.update(distractors or {})
    return Gallery(dataset.gallery_root, work / "indexes", models=models, models_dir=work / "models",
                   files=files, learn_from=dataset.gallery)


def exact_similarities(vectors: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """Brute-force similarities, ``(q, n)``, higher = more alike: the inner product for ``cosine`` (unit
    float32 rows: it is the cosine), minus the Hamming distance in bits for ``hamming`` (uint8 packed
    bits or 0/1 rows). ``vectors`` ``(n, d)``, ``queries`` ``(q, d)``. Raises ``ValueError`` for another
    metric."""
    vectors, queries = np.asarray(vectors), np.asarray(queries)
    if metric == "cosine":
        return queries.astype(np.float32) @ vectors.astype(np.float32).T
    if metric == "hamming":
        a = np.unpackbits(queries.astype(np.uint8), axis=1) if queries.dtype == np.uint8 else queries
        b = np.unpackbits(vectors.astype(np.uint8), axis=1) if vectors.dtype == np.uint8 else vectors
        return -(a[:, None, :] != b[None, :, :]).sum(axis=2)
    raise ValueError(f"no exact search for metric {metric}")


def exact_top(vectors: np.ndarray, queries: np.ndarray, metric: str, k: int) -> np.ndarray:
    """Row ids of the exact top-k by brute force (the reference for approximate indexes): ``(q, min(k, n))``
    int64, best first; arguments as :func:`exact_similarities`, which raises ``ValueError`` for an
    unknown metric.
    """
    similarity = exact_similarities(vectors, queries, metric)
    k = min(k, similarity.shape[1])
    top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(similarity, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def evaluate_method(
    gallery: Gallery,
    dataset: Dataset,
    method: str,
    queries: Sequence[Query],
    *,
    top: int | None = None,
    index_spec: str | None = None,
    batch_size: int | None = None,
    data_seen: str = "nothing from this dataset (pretrained or model-free)",
) -> MethodResult:
    """Index ``gallery`` with ``method``, search it with every query, and score the rankings.

    Every query is searched twice: once timed as a user's search (``k = SEARCH_K``), once for the
    ranking that is scored (the whole gallery, or its ``top`` results), with the query's own gallery
    image left out; where the index returns fewer, :func:`complete_ranking` adds the rest in exact order. Times are wall-clock (``time.perf_counter``), after one warm-up search.

    Raises what indexing and searching raise (:class:`LensError` and its kinds, e.g. an unknown method,
    a model that cannot load, no readable gallery image); ``lens eval`` records it as a failed method.
    """
    started = time.perf_counter()
    [report] = gallery.index([method], index_spec=index_spec, batch_size=batch_size, progress=True)
    build_seconds = time.perf_counter() - started
    stored = gallery.open(method)
    searcher = gallery.method(method)
    info = searcher.info
    depth = min(top or len(stored.items), len(stored.items))
    rankings, kinds = [], set()
    for n, query in enumerate(queries):
        picture = query.picture()
        if n == 0:  # warm-up: the first call pays one-off costs (lazy init, allocator) a user pays once
            gallery.search(picture, method, k=SEARCH_K)
        t0 = time.perf_counter()
        gallery.search(picture, method, k=SEARCH_K)
        seconds = time.perf_counter() - t0
        own = dataset.exclude.get(query.path)
        results = gallery.search(picture, method, k=depth + (1 if own else 0))
        kept = [r for r in results if r.path != own][:depth]
        kinds.update(r.kind for r in kept[:SAMPLE_DEPTH])
        paths, scores = [r.path for r in kept], [r.score for r in kept]
        if len(paths) < depth:  # an approximate index returned fewer: the rest in exact-search order
            paths, scores = complete_ranking(paths, scores, stored, searcher, picture, own, depth)
        relevant = dataset.relevant[query.path]
        rankings.append(Ranking(
            query=str(query.path), ids=[r.path for r in kept[:SAMPLE_DEPTH]],
            labels=[r.score_text for r in kept[:SAMPLE_DEPTH]],
            scores=np.asarray(scores, np.float64),
            relevant=np.fromiter((path in relevant for path in paths), bool, len(paths)),
            n_relevant=len(relevant), seconds=seconds,
        ))
    aps = [average_precision(r.relevant, r.scores, r.n_relevant) for r in rankings]
    scored = [r for r, ap in zip(rankings, aps) if ap is not None]
    recall = {k: float(np.mean([hit_at_k(r.relevant, r.scores, k) for r in scored])) if scored else float("nan")
              for k in RECALL_KS}
    files = stored.manifest.get("files", {})
    index_bytes = sum(v["bytes"] for name, v in files.items() if name not in ("vectors.npy", "items.json"))
    times = [r.seconds * 1000 for r in rankings]
    return MethodResult(
        method=method, map=mean_or_nan(aps), recall=recall, queries_scored=len(scored),
        queries_without_relevant=len(rankings) - len(scored),
        query_ms_p50=_percentile(times, 50), query_ms_p95=_percentile(times, 95),
        embed_ms_per_image=1000 / report.images_per_second if report.images_per_second else float("nan"),
        build_seconds=build_seconds, index_bytes=index_bytes,
        stored_bytes=sum(v["bytes"] for v in files.values()), index_spec=stored.manifest["index"],
        ann_recall_at_10=_ann_recall(gallery, method, queries),
        model=info.model, weights=info.weights, score_kind=_score_kind(searcher, kinds),
        data_seen=data_seen, rankings=rankings,
    )


def complete_ranking(paths: list[str], scores: list[float], stored: Any, searcher: Any, picture: Any,
                     own: str | None, depth: int) -> tuple[list[str], list[float]]:
    """Extend a search's ranking (``paths``, best first, with their ``scores``) to ``depth`` images.

    An approximate index (FAISS HNSW, Annoy) returns fewer than k results when k is near the gallery
    size (HNSW32 gave 810 of 3,068 on clothing), and an image it never returns would count as never
    found, understating mAP over the full ranking. The images not yet ranked follow in exact-search
    order over the method's stored vectors (:func:`exact_similarities`), scored strictly below the last ranked one
    (their order and ties kept), ``own`` (the query's own gallery image) left out. Methods without a
    vector index or an exact metric keep their ranking as it is. Returns new lists; raises what
    ``searcher.embed`` raises.
    """
    info = searcher.info
    if stored.index is None or info.metric not in ("cosine", "hamming"):
        return paths, scores
    ranked = set(paths) | {own}
    similarity = exact_similarities(stored.vectors, searcher.embed([picture]), info.metric)[0]
    rest = [int(i) for i in np.argsort(-similarity, kind="stable")
            if stored.items[i].path not in ranked][: depth - len(paths)]
    if not rest:
        return paths, scores
    exact = similarity[rest]
    last = min(scores) if scores else 0.0
    tail = np.asarray(exact, np.float64) - float(exact[0]) + last - 1e-6
    return [*paths, *(stored.items[i].path for i in rest)], [*scores, *tail.tolist()]


def _score_kind(method: object, kinds: set[str]) -> str:
    """What the scores of a method's top results are, in words."""
    if isinstance(method, Reranks) and method.score_kind in kinds:
        return (f"{SCORE_LABELS.get(method.score_kind, method.score_kind)}; only its top {method.candidates} "
                "candidates are verified, the rest of the ranking keeps its vector index's order")
    return ", ".join(SCORE_LABELS.get(kind, kind) for kind in sorted(kinds)) or "–"


def _ann_recall(gallery: Gallery, method: str, queries: Sequence[Query], k: int = 10,
                sample: int = 200) -> float | None:
    """Recall@k of the method's index against exact search over its stored vectors."""
    stored = gallery.open(method)
    searcher = gallery.method(method)
    info = searcher.info
    if stored.index is None or info.metric not in ("cosine", "hamming") or not len(stored.items) or not queries:
        return None
    chosen = list(queries[:sample])
    queries = np.concatenate([searcher.embed([q.picture() for q in chosen[i : i + _EMBED_BATCH]])
                              for i in range(0, len(chosen), _EMBED_BATCH)])
    approximate, _ = stored.index.search(queries, k)
    exact = exact_top(stored.vectors, queries, info.metric, k)
    hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) / len(e) for a, e in zip(approximate, exact)]
    return float(np.mean(hits))


def environment() -> dict[str, Any]:
    """Versions and hardware, for results.json."""
    import importlib.metadata as md

    import torch

    from lens.version import __version__

    versions = {"lens": __version__, "python": platform.python_version()}
    for package in ("torch", "torchvision", "transformers", "timm", "annoy", "faiss-cpu", "opencv-python",
                    "imagehash", "ultralytics", "numpy"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "versions": versions,
        "hardware": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "platform": platform.platform()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def prepare_trained(gallery: Gallery, dataset: Dataset, method: str, *, backbone: str | None = None,
                    seed: int = 0, progress: bool = True) -> str:
    """Train a trainable ``method`` on what the dataset's layout allows; say what the method learnt from.

    Trainable methods learn from the dataset's gallery images only (never its queries, unless they are
    gallery images too, nor distractors): ``train/`` with its class labels for a split dataset, the
    ``"gallery"`` list of a groundtruth.json dataset without labels, and every image without labels
    for a leave-one-out dataset (whose queries are among them; without labels, theirs stay unknown).
    A model given with ``models=`` is used as it is; one already trained on exactly this data is reused.
    Raises :class:`LensError` when training fails (e.g. too few images, a backbone that cannot load).
    """
    import json
    from dataclasses import replace

    from lens.methods import is_trained, method_slug

    root = dataset.train_root or dataset.gallery_root
    gallery_note = f"the dataset's {len(dataset.gallery)} gallery images in {root}"
    if not is_trained(method):
        if isinstance(gallery.method(method), LearnsFromGallery):
            return f"fitted on {gallery_note} (no labels; never the queries or distractors)"
        return "nothing from this dataset (pretrained or model-free)"
    given = method in gallery.models
    folder = Path(gallery.models[method]) if given else gallery.models_dir / method_slug(method)
    labels = "none" if method == "autoencoder" else dataset.train_labels
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if not given:
        from lens.training import get_trainer
        from lens.training.loop import training_data

        wanted = training_data(root, labels, only=dataset.gallery).fingerprint
        fresh = manifest is None or manifest["data"].get("data_fingerprint") != wanted or (
            backbone is not None and manifest["parameters"].get("backbone", backbone) != backbone)
        if fresh:
            trainer = get_trainer(method)
            given_options = {"labels": labels, "backbone": backbone}
            options = {name: value for name, value in given_options.items() if value and trainer.accepts(name)}
            report = trainer.train(root, folder, replace(trainer.defaults, seed=seed), progress=progress,
                                   only=dataset.gallery, **options)
            manifest = report.manifest
    if manifest is None:
        return f"the given model {folder} (no manifest: unknown training data)"
    data = manifest["data"]
    backbone_note = manifest["parameters"].get("backbone")
    source = (f"the given model {folder}, trained on {data['images']} images of '{Path(data['gallery']).name}'"
              if given else f"trained on {data['images']} images: {gallery_note}")
    return (f"{source} (labels: {data['labels']}" + (f"; backbone {backbone_note}" if backbone_note else "")
            + f"), {manifest['seconds']['total']:.0f} s of training on {manifest['device']}")
