"""Labelled retrieval datasets, in the two layouts ``lens eval`` reads.

1. A folder of class sub-folders, optionally split into ``train/`` and ``test/`` (or ``train/``,
   ``validation/``, ``test/``): queries are the test images (every image, leave-one-out, when there are
   no splits), the gallery is ``train/`` (or the whole folder), and relevant means the same class.
2. A folder with ``images/`` and ``groundtruth.json`` = ``{"gallery": [relpath, ...] (optional),
   "queries": {relpath: [relevant relpath, ...]}}``, paths relative to ``images/``; without "gallery",
   the gallery is every image. A query never counts itself: it is removed from its own ranking.

Whatever the layout, exactly the dataset's gallery is indexed (never the other images of its folder),
and trainable or fitted methods learn only from the gallery images, never from queries that are not
in it: ``train/`` of a split dataset (with its class labels), the ``"gallery"`` list of a
groundtruth.json dataset (without labels), every image of a leave-one-out dataset (without labels:
the queries are among them).

Distractors (:func:`distractor_files`) are extra gallery images from other folders, relevant to no
query, for measuring at scale (Holidays + Flickr100k, Oxford + 1M in the literature).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lens.errors import LensError
from lens.images import iter_image_files

SPLITS = ("train", "validation", "test")
#: gallery ids of distractors start with this (no dataset id can: those are paths below images/)
DISTRACTOR_PREFIX = "~distractors/"


@dataclass
class Dataset:
    """A labelled retrieval dataset as ``lens eval`` reads it (layouts in the module docstring).

    Gallery ids are paths relative to ``gallery_root`` (POSIX ``/``); queries are files. ``relevant[q]``
    never holds the query's own gallery id (``exclude[q]``), so a query never counts itself.
    """

    name: str
    gallery_root: Path  #: the folder the gallery's images are in
    #: gallery image ids (paths relative to gallery_root), in the folder's scan order: exactly what is
    #: indexed, and what trainable methods learn from
    gallery: list[str]
    queries: list[Path]  #: query image files
    relevant: dict[Path, set[str]]  #: query -> relevant gallery ids
    exclude: dict[Path, str] = field(default_factory=dict)  #: query -> its own gallery id, left out
    kind: str = ""  #: "class folders (train/test)", "class folders (leave-one-out)", "groundtruth.json"
    train_root: Path | None = None  #: the folder of the training images (the gallery's images)
    train_labels: str = "none"  #: labels trainable methods may use: "auto" (class folders) or "none"
    labels: dict[str, str] = field(default_factory=dict)  #: gallery id -> class, when classes exist

    def describe(self) -> str:
        """One line for people: the name, the layout, the gallery's size and folder, the number of queries."""
        return (f"{self.name}: {self.kind}; gallery {len(self.gallery)} images in {self.gallery_root}, "
                f"{len(self.queries)} queries")


def _classes(root: Path) -> dict[str, str]:
    """relpath -> class (its first folder) for every image below ``root`` inside a class folder."""
    labels = {}
    for path in iter_image_files(root):
        rel = path.relative_to(root)
        if len(rel.parts) >= 2:
            labels[rel.as_posix()] = rel.parts[0]
    return labels


def load_dataset(folder: str | Path, *, max_queries: int | None = None, seed: int = 0) -> Dataset:
    """The dataset in ``folder``, its layout found from what is there (module docstring): ``groundtruth.json``,
    else ``train/`` + ``test/`` (or ``validation/``), else class sub-folders (leave-one-out).

    ``max_queries``: keep a random sample of that many queries (``random.Random(seed)``, sorted), for a
    quicker run. Raises :class:`LensError` for a missing folder, an unreadable ``groundtruth.json``, a
    gallery list naming files that are not there, a folder that is neither layout, or no queries."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LensError(f"dataset folder '{folder}' does not exist")
    if (folder / "groundtruth.json").is_file():
        dataset = _groundtruth_dataset(folder)
    elif (folder / "train").is_dir() and ((folder / "test").is_dir() or (folder / "validation").is_dir()):
        dataset = _split_dataset(folder)
    else:
        dataset = _leave_one_out_dataset(folder)
    if not dataset.queries:
        raise LensError(f"no queries found in '{folder}'")
    if max_queries and len(dataset.queries) > max_queries:
        kept = sorted(random.Random(seed).sample(dataset.queries, max_queries))
        dataset.queries = kept
        dataset.relevant = {q: dataset.relevant[q] for q in kept}
        dataset.exclude = {q: dataset.exclude[q] for q in kept if q in dataset.exclude}
    return dataset


def _groundtruth_dataset(folder: Path) -> Dataset:
    images = folder / "images"
    try:
        truth = json.loads((folder / "groundtruth.json").read_text())
        queries = truth["queries"]
    except (OSError, ValueError, KeyError) as exc:
        raise LensError(f"cannot read {folder / 'groundtruth.json'}: {exc}") from exc
    everything = [p.relative_to(images).as_posix() for p in iter_image_files(images)]
    listed = set(truth.get("gallery") or everything)
    missing = sorted(listed - set(everything))
    if missing:
        raise LensError(f"{len(missing)} gallery images of groundtruth.json are not in {images}, e.g. {missing[0]}")
    gallery = [p for p in everything if p in listed]  # the scan order: as if the gallery were a folder
    in_gallery = set(gallery)
    paths = [images / q for q in queries]
    return Dataset(
        name=folder.name, gallery_root=images, gallery=gallery, queries=paths,
        relevant={images / q: set(rel) & in_gallery - {q} for q, rel in queries.items()},
        exclude={images / q: q for q in queries if q in in_gallery},
        kind="groundtruth.json", train_root=images,
    )


def _split_dataset(folder: Path) -> Dataset:
    train = folder / "train"
    query_root = folder / "test" if (folder / "test").is_dir() else folder / "validation"
    labels = _classes(train)
    by_class: dict[str, set[str]] = {}
    for rel, label in labels.items():
        by_class.setdefault(label, set()).add(rel)
    query_labels = _classes(query_root)
    queries = [query_root / rel for rel in sorted(query_labels)]
    return Dataset(
        name=folder.name, gallery_root=train, gallery=sorted(labels), queries=queries,
        relevant={query_root / rel: by_class.get(label, set()) for rel, label in query_labels.items()},
        kind=f"class folders (queries: {query_root.name}/, gallery: train/)", train_root=train,
        labels=labels, train_labels="auto",
    )


def _leave_one_out_dataset(folder: Path) -> Dataset:
    labels = _classes(folder)
    if not labels:
        raise LensError(
            f"'{folder}' is not a dataset: expected class sub-folders (optionally train/ and test/), "
            "or images/ with groundtruth.json"
        )
    by_class: dict[str, set[str]] = {}
    for rel, label in labels.items():
        by_class.setdefault(label, set()).add(rel)
    queries = [folder / rel for rel in sorted(labels)]
    return Dataset(
        name=folder.name, gallery_root=folder, gallery=sorted(labels), queries=queries,
        relevant={folder / rel: by_class[labels[rel]] - {rel} for rel in labels},
        exclude={folder / rel: rel for rel in labels},
        kind="class folders (leave-one-out)", train_root=folder, labels=labels,
    )


def distractor_files(folders: Sequence[str | Path], dataset: Dataset) -> dict[str, Path]:
    """Every image below ``folders`` as extra gallery images: {gallery id: file}, in scan order.

    Ids are ``~distractors/<n>/<path relative to folder n>`` (n = the folder's position, from 1), so
    they never collide with the dataset's ids. A file listed twice (nested or repeated folders) counts
    once. Raises LensError for a folder that does not exist, holds no image, or holds images of the
    dataset itself (they would count as irrelevant copies of relevant images).
    """
    clash = next((g for g in dataset.gallery if g.startswith(DISTRACTOR_PREFIX)), None)
    if clash:
        raise LensError(f"the dataset's image '{clash}' has the name distractors get ({DISTRACTOR_PREFIX}...); "
                        "rename its folder to add distractors")
    dataset_files = {(dataset.gallery_root / g).resolve() for g in dataset.gallery}
    dataset_files |= {q.resolve() for q in dataset.queries}
    files: dict[str, Path] = {}
    seen: set[Path] = set()
    for number, folder in enumerate(map(Path, folders), 1):
        if not folder.is_dir():
            raise LensError(f"distractor folder '{folder}' does not exist or is not a folder")
        found = 0
        for path in iter_image_files(folder):
            resolved = path.resolve()
            if resolved in dataset_files:
                raise LensError(f"distractor folder '{folder}' holds images of the dataset itself, e.g. "
                                f"'{path}'; distractors must be unrelated images")
            found += 1
            if resolved not in seen:
                seen.add(resolved)
                files[f"{DISTRACTOR_PREFIX}{number}/{path.relative_to(folder).as_posix()}"] = path
        if not found:
            raise LensError(f"no images found in distractor folder '{folder}'")
    return files
