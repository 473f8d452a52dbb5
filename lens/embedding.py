"""Embedding many image files in batches, with decoding overlapped with the model's work.

Two ways, chosen by the method's ``streams`` (see :class:`lens.types.Method`):

- one batch at a time (``streams == 1``): worker threads read, decode and ``prepare`` (resize,
  normalise) the images of the next batches while the current batch runs through the model, so the
  model rarely waits for the disk or the decoder;
- side by side (``streams > 1``, the deep backbones in ONNX Runtime): each of ``streams`` threads
  reads, decodes and prepares a batch and then runs it through a one-thread model. While one stream
  decodes, the other's model has the cores, and no core is kept spinning idle. On 2 cores this builds
  EfficientNet-Lite0 indexes 16-21% faster (docs/performance.md, section 1).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from lens.images import load_image
from lens.types import Method

log = logging.getLogger("lens")
T = TypeVar("T")


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


#: Images per model call when none is asked for. On 2 CPU cores batches of 8 were as fast as or faster
#: than 32 for every backbone in both runtimes (EfficientNet-Lite0 in ONNX Runtime: 117 vs 106 img/s)
#: and hold a quarter of the memory; a GPU wants bigger batches.
CPU_BATCH_SIZE, GPU_BATCH_SIZE = 8, 32


def default_batch_size(method: Method) -> int:
    """``GPU_BATCH_SIZE`` when ``method`` runs on a GPU, else ``CPU_BATCH_SIZE``."""
    device = getattr(method, "device", None)
    return GPU_BATCH_SIZE if getattr(device, "type", "cpu") == "cuda" else CPU_BATCH_SIZE


def embed_files(
    method: Method,
    paths: Sequence[Path],
    *,
    batch_size: int | None = None,
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
    store per-image data in the index, like SIFT's keypoints). ``workers`` decoding threads and
    ``prefetch`` batches ahead apply to methods that embed one batch at a time; a method with
    ``streams > 1`` decodes on its streams' threads. ``batch_size`` defaults to
    :func:`default_batch_size`.
    """
    batch_size = batch_size or default_batch_size(method)
    chunks: list[np.ndarray] = []
    kept: list[Any] = []
    done: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    with tqdm(total=len(paths), unit="img", desc=desc or method.info.name, disable=not progress,
              dynamic_ncols=True) as bar:
        streams = max(1, int(getattr(method, "streams", 1)))
        if streams > 1:
            embedded = _streamed(method, paths, batch_size, streams)
        else:
            embedded = _overlapped(method, paths, batch_size, workers, prefetch)
        for batch, results, vectors in embedded:
            items = []
            for path, (item, error) in zip(batch, results):
                if error is None:
                    items.append(item)
                    done.append(path)
                else:
                    skipped.append((path, error))
                    log.warning("skipped %s: %s", path, error)
            if vectors is not None:
                chunks.append(vectors)
                if keep_prepared:
                    kept.extend(items)
            bar.update(len(batch))
            if on_progress is not None:  # not bar.n: a disabled bar (progress=False) never counts
                on_progress(len(done) + len(skipped), len(paths))
    if chunks:
        vectors = np.concatenate(chunks)
    else:
        vectors = np.zeros((0, method.info.dim), dtype=np.float32)
    return Embedded(vectors, done, skipped, kept)


Prepared = list[tuple[Any, str | None]]  # per file: (prepare's output, None) or (None, why it failed)


def _overlapped(
    method: Method, paths: Sequence[Path], batch_size: int, workers: int, prefetch: int
) -> Iterator[tuple[Sequence[Path], Prepared, np.ndarray | None]]:
    """One batch at a time through ``embed_prepared``; up to ``prefetch`` next batches decode meanwhile."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lens-decode") as pool:

        def decode(batch: Sequence[Path]) -> list[Future]:
            return [pool.submit(_prepare, method, path) for path in batch]

        for batch, futures in _ahead(decode, _batches(paths, batch_size), max(1, prefetch)):
            results = [future.result() for future in futures]
            items = [item for item, error in results if error is None]
            yield batch, results, np.asarray(method.embed_prepared(items)) if items else None


def _streamed(
    method: Method, paths: Sequence[Path], batch_size: int, streams: int
) -> Iterator[tuple[Sequence[Path], Prepared, np.ndarray | None]]:
    """``streams`` batches at once, each decoded and embedded (``embed_stream``) by its own thread."""

    def run(batch: Sequence[Path]) -> tuple[Prepared, np.ndarray | None]:
        results = [_prepare(method, path) for path in batch]
        items = [item for item, error in results if error is None]
        return results, np.asarray(method.embed_stream(items)) if items else None

    try:
        with ThreadPoolExecutor(max_workers=streams, thread_name_prefix="lens-embed") as pool:
            # one batch queued beyond the streams, so a stream that finishes starts the next at once
            for batch, future in _ahead(lambda b: pool.submit(run, b), _batches(paths, batch_size), streams + 1):
                yield (batch, *future.result())
    finally:
        release = getattr(method, "release_streams", None)
        if release is not None:
            release()


def _batches(paths: Sequence[Path], batch_size: int) -> list[Sequence[Path]]:
    return [paths[i : i + batch_size] for i in range(0, len(paths), max(1, batch_size))]


def _ahead(start: Callable[[Sequence[Path]], T], batches: list[Sequence[Path]], ahead: int
           ) -> Iterator[tuple[Sequence[Path], T]]:
    """Each batch with what ``start`` gave for it, in order, keeping ``ahead`` batches started."""
    pending: deque[tuple[Sequence[Path], T]] = deque()
    upcoming = iter(batches)

    def start_next() -> None:
        batch = next(upcoming, None)
        if batch is not None:
            pending.append((batch, start(batch)))

    for _ in range(ahead):
        start_next()
    while pending:
        head = pending.popleft()
        start_next()
        yield head
