"""``lens eval``: every method measured the same way on one labelled dataset.

For each method: build (or refresh) its index over the dataset's gallery, run every query through the
public search path exactly as a user's query runs (one query at a time, timed), and score the
rankings (see :mod:`lens.evaluation.metrics` for the conventions). Approximate indexes are also compared with
exact search over the stored vectors (recall@10).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lens.evaluation.datasets import Dataset
from lens.gallery import SCORE_LABELS, Gallery
from lens.images import ImageError, load_image
from lens.evaluation.metrics import average_precision, hit_at_k, mean_or_nan

log = logging.getLogger("lens")
RECALL_KS = (1, 5, 10)


@dataclass
class Ranking:
    """One query's ranking as scored: gallery ids best first, their scores and relevance."""

    query: str
    ids: list[str]
    scores: list[float]
    relevant: list[bool]
    n_relevant: int
    seconds: float


@dataclass
class MethodResult:
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
    index_spec: str
    ann_recall_at_10: float | None  #: approximate index vs exact search; None when not applicable
    model: str
    weights: str
    score_kind: str
    data_seen: str  #: what the method learnt from, if anything
    error: str | None = None
    rankings: list[Ranking] = field(default_factory=list, repr=False)

    @classmethod
    def failed(cls, method: str, error: str) -> MethodResult:
        nan = float("nan")
        return cls(method, nan, {}, 0, 0, nan, nan, nan, 0.0, 0, 0, "", None, "", "", "", "", error=error)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("rankings")
        return data


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def load_queries(dataset: Dataset, detect: Callable[[Image.Image], Image.Image] | None) -> dict[Path, Image.Image]:
    """Decode every query once (cropped to its main subject when ``detect`` is given)."""
    pictures = {}
    for path in dataset.queries:
        try:
            picture = load_image(path)
        except ImageError as exc:
            log.warning("query skipped: %s", exc)
            continue
        pictures[path] = detect(picture) if detect else picture
    return pictures


def exact_top(vectors: np.ndarray, queries: np.ndarray, metric: str, k: int) -> np.ndarray:
    """Ids of the exact top-k by brute force (the reference for approximate indexes)."""
    vectors, queries = np.asarray(vectors), np.asarray(queries)
    if metric == "cosine":
        similarity = queries.astype(np.float32) @ vectors.astype(np.float32).T
    elif metric == "hamming":
        a = np.unpackbits(queries.astype(np.uint8), axis=1) if queries.dtype == np.uint8 else queries
        b = np.unpackbits(vectors.astype(np.uint8), axis=1) if vectors.dtype == np.uint8 else vectors
        similarity = -(a[:, None, :] != b[None, :, :]).sum(axis=2)
    else:
        raise ValueError(f"no exact search for metric {metric}")
    k = min(k, vectors.shape[0])
    top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(similarity, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def evaluate_method(
    gallery: Gallery,
    dataset: Dataset,
    method: str,
    pictures: dict[Path, Image.Image],
    *,
    top: int | None = None,
    index_spec: str | None = None,
    batch_size: int | None = None,
    data_seen: str = "nothing from this dataset (pretrained or model-free)",
) -> MethodResult:
    started = time.perf_counter()
    [report] = gallery.index([method], index_spec=index_spec, batch_size=batch_size, progress=True)
    build_seconds = time.perf_counter() - started
    stored = gallery.open(method)
    info = gallery.method(method).info
    in_gallery = set(dataset.gallery)
    depth = top or len(in_gallery)
    if pictures:  # warm-up: the first call pays one-off costs (lazy init, allocator) a user pays once
        gallery.search(next(iter(pictures.values())), method, k=depth)
    rankings, kinds = [], set()
    for path, picture in pictures.items():
        own = dataset.exclude.get(path)
        t0 = time.perf_counter()
        results = gallery.search(picture, method, k=depth + (1 if own else 0))
        seconds = time.perf_counter() - t0
        kept = [r for r in results if r.path != own and r.path in in_gallery][:depth]
        kinds.update(r.kind for r in kept)
        relevant = dataset.relevant[path]
        rankings.append(Ranking(
            query=str(path), ids=[r.path for r in kept], scores=[r.score for r in kept],
            relevant=[r.path in relevant for r in kept], n_relevant=len(relevant), seconds=seconds,
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
        ann_recall_at_10=_ann_recall(gallery, method, list(pictures.values())),
        model=info.model, weights=info.weights,
        score_kind=", ".join(SCORE_LABELS.get(kind, kind) for kind in sorted(kinds)) or "–",
        data_seen=data_seen, rankings=rankings,
    )


def _ann_recall(gallery: Gallery, method: str, pictures: list[Image.Image], k: int = 10, sample: int = 200) -> float | None:
    """Recall@k of the method's index against exact search over its stored vectors."""
    stored = gallery.open(method)
    info = gallery.method(method).info
    if info.metric not in ("cosine", "hamming") or not len(stored.items):
        return None
    queries = gallery.method(method).embed(pictures[:sample])
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
    """Train a trainable ``method`` on the dataset's training images only; say what it learnt from.

    A model given with ``models=`` is used as it is; one already trained on exactly this training data
    is reused. Leave-one-out datasets have their queries among the training images, so there the
    model trains without labels (self-supervised) to keep the queries' labels out of it.
    """
    import json
    from dataclasses import replace

    from lens.methods import is_trained, method_slug

    if not is_trained(method):
        return "nothing from this dataset (pretrained or model-free)"
    given = method in gallery.models
    folder = Path(gallery.models[method]) if given else gallery.models_dir / method_slug(method)
    labels = "none" if dataset.kind.startswith("class folders (leave") or dataset.train_root is None else "auto"
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    root = str(Path(dataset.train_root or dataset.gallery_root).resolve())
    fresh = manifest is None or manifest["data"]["gallery"] != root or (
        labels == "none" and manifest["data"]["labels"] != "none")
    if not given and fresh:
        from lens.training import get_trainer

        trainer = get_trainer(method)
        given_options = {"labels": labels, "backbone": backbone}
        options = {name: value for name, value in given_options.items() if value and trainer.accepts(name)}
        report = trainer.train(root, folder, replace(trainer.defaults, seed=seed), progress=progress, **options)
        manifest = report.manifest
    if manifest is None:
        return f"the model in {folder} (no manifest: unknown training data)"
    data = manifest["data"]
    backbone_note = manifest["parameters"].get("backbone")
    return (f"trained on {data['images']} images of {data['gallery']} (labels: {data['labels']}"
            + (f"; backbone {backbone_note}" if backbone_note else "")
            + f"), {manifest['seconds']['total']:.0f} s of training on {manifest['device']}")
