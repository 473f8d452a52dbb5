"""Embedding many image files in batches, with decoding overlapped with the model's work.

Worker threads read, decode and ``prepare`` (resize, normalise) the images of the next batches while
the current batch runs through the model, so the model rarely waits for the disk or the decoder.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lens.images import load_image
from lens.methods.base import Method

log = logging.getLogger("lens")


@dataclass
class Embedded:
    """The outcome of :func:`embed_files`: vectors for the files that could be read, and the rest."""

    vectors: np.ndarray  #: one row per path in ``paths``
    paths: list[Path]  #: the files embedded, in input order
    skipped: list[tuple[Path, str]] = field(default_factory=list)  #: unreadable files and why
    prepared: list[Any] = field(default_factory=list)  #: ``prepare`` outputs, row by row, if kept


def _prepare(method: Method, path: Path) -> tuple[Any, str | None]:
    try:
        return method.prepare(load_image(path, min_side=getattr(method, "decode_size", None))), None
    except Exception as exc:  # one bad file must never stop an indexing run
        return None, str(exc) or type(exc).__name__


def embed_files(
    method: Method,
    paths: Sequence[Path],
    *,
    batch_size: int = 32,
    workers: int = 2,
    prefetch: int = 2,
    progress: bool = True,
    desc: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    keep_prepared: bool = False,
) -> Embedded:
    """Embed ``paths`` with ``method``; unreadable files are skipped with a warning.

    ``on_progress(done, total)`` is called after every batch (e.g. to show progress in the app).
    ``keep_prepared`` also returns what ``prepare`` gave for each embedded file (for methods that
    store per-image data in the index, like SIFT's keypoints).
    """
    chunks: list[np.ndarray] = []
    kept: list[Any] = []
    done: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    with tqdm(total=len(paths), unit="img", desc=desc or method.info.name, disable=not progress,
              dynamic_ncols=True) as bar:
        for batch, results in _prefetched(method, paths, batch_size, workers, prefetch):
            items = []
            for path, (item, error) in zip(batch, results):
                if error is None:
                    items.append(item)
                    done.append(path)
                else:
                    skipped.append((path, error))
                    log.warning("skipped %s: %s", path, error)
            if items:
                chunks.append(np.asarray(method.embed_prepared(items)))
                if keep_prepared:
                    kept.extend(items)
            bar.update(len(batch))
            if on_progress is not None:
                on_progress(bar.n, len(paths))
    if chunks:
        vectors = np.concatenate(chunks)
    else:
        vectors = np.zeros((0, method.info.dim), dtype=np.float32)
    return Embedded(vectors, done, skipped, kept)


def _prefetched(
    method: Method, paths: Sequence[Path], batch_size: int, workers: int, prefetch: int
) -> Iterator[tuple[Sequence[Path], list[tuple[Any, str | None]]]]:
    """Yield (batch, prepared items) with up to ``prefetch`` batches decoding ahead."""
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), max(1, batch_size))]
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lens-decode") as pool:
        pending: deque[tuple[Sequence[Path], list[Future]]] = deque()
        upcoming = iter(batches)

        def submit_next() -> None:
            batch = next(upcoming, None)
            if batch is not None:
                pending.append((batch, [pool.submit(_prepare, method, p) for p in batch]))

        for _ in range(max(1, prefetch)):
            submit_next()
        while pending:
            batch, futures = pending.popleft()
            submit_next()
            yield batch, [future.result() for future in futures]
