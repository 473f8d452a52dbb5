"""The ``lens`` command line: ``lens index``, ``search``, ``detect``, ``methods``, ``train``, ``eval``.

Every command is a thin shell over the library (:class:`lens.Gallery`); errors a user can fix are
printed as one line (``lens: error: ...``) with exit status 1, never as a traceback. ``lens search``
takes many photos in one call (files, folders, ``-`` for paths on stdin): the model loads once and
the photos are embedded in batches. A command imports what it uses when it runs (``lens search
--method phash`` never imports torch), so the start-up of a call is what its method needs.

Exit status: 0 done; 1 an error the user can fix (or, for ``search`` with many photos, some photos
could not be searched; for ``index``, some methods could not be built, the others were); 2 a usage
error (argparse); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from lens.errors import LensError
from lens.methods import parse_models

#: indexed by default: a global embedding ("visually similar") and local features ("exact matches")
DEFAULT_INDEX_METHODS = "resnet50,local"
#: searched by default: the combined search, exact matches first (see lens.search)
DEFAULT_SEARCH = "auto"
#: ``--ray`` without an address: start a local Ray
LOCAL_RAY = "local"
Handler = Callable[[argparse.Namespace], int]


def _parse_box(text: str | None, size: tuple[int, int] | None = None) -> tuple[float, float, float, float] | None:
    """``--box x1,y1,x2,y2`` checked by :func:`lens.images.check_box` (against the query's ``size``)."""
    from lens.images import check_box

    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise LensError(f"--box expects x1,y1,x2,y2 in pixels, got '{text}'") from None
    if len(values) != 4:
        raise LensError(f"--box expects x1,y1,x2,y2 in pixels, got '{text}'")
    return check_box(values, size)


def _gallery(args: argparse.Namespace):
    from lens.gallery import Gallery

    return Gallery(args.gallery, args.index_dir, models=parse_models(args.model))


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index-dir", "--out", dest="index_dir", metavar="DIR",
                        help="where the gallery's indexes live (default: indexes/<gallery folder name>-<hash of its path>)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="weights for a method: a hub id or a local folder, e.g. "
                             "resnet50=./weights/resnet-50 (repeatable)")


# -- lens index ------------------------------------------------------------------------------------
def _index_parser(sub: argparse._SubParsersAction) -> Handler:
    parser = sub.add_parser("index", help="embed every image of a folder and build per-method indexes")
    parser.add_argument("gallery", metavar="FOLDER", help="folder of images (searched recursively)")
    parser.add_argument("--methods", default=DEFAULT_INDEX_METHODS,
                        help=f"comma-separated method specs (default: {DEFAULT_INDEX_METHODS}: visually similar "
                             "images and exact matches); see `lens methods`. A method that cannot be built "
                             "(e.g. its model cannot be downloaded) is reported and the others are still built "
                             "(exit status 1)")
    parser.add_argument("--index", dest="index_spec", metavar="SPEC",
                        help="index backend spec (default: what an earlier build was given, else annoy up to "
                             "1,000 images and faiss:HNSW32:efSearch=64 above): "
                             "annoy, annoy:trees=100, faiss:Flat, faiss:HNSW32:efSearch=64, "
                             "faiss:IVF256,PQ16:nprobe=16, faiss:PQ32:rerank=100, lsh:256:rerank=100, "
                             "milvus:./lens.db, milvus:http://127.0.0.1:19530:HNSW:M=32,ef=64 "
                             "(see docs/index-backends.md, docs/scaling-out.md)")
    parser.add_argument("--batch-size", type=int, help="images per model call (default: 8 on CPU, 32 on a GPU)")
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--ray", nargs="?", const=LOCAL_RAY, metavar="ADDRESS",
                        help="embed on a Ray cluster (Ray Data; pip install 'lens[scale]'): without ADDRESS a "
                             "local Ray on this machine, bound to 127.0.0.1; else the cluster's address (auto, "
                             "HOST:6379, ray://HOST:10001), whose nodes see the gallery at the same path. sift "
                             "and local are still built here (see docs/scaling-out.md)")
    parser.add_argument("--ray-actors", type=int, metavar="N",
                        help="embedding actors, one model each (default: one per GPU, else one per CPU)")
    _add_common(parser)
    return _run_index


def _run_index(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    gallery = _gallery(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise LensError("--methods is empty")
    if args.ray_actors is not None and args.ray_actors < 1:
        raise LensError("--ray-actors must be at least 1")
    started = time.perf_counter()
    failed: list[tuple[str, str]] = []  # a method that cannot be built does not stop the others
    cluster = None
    if args.ray is not None:
        from lens.distributed import RayCluster

        cluster = RayCluster(None if args.ray == LOCAL_RAY else args.ray, actors=args.ray_actors)
    with cluster or contextlib.nullcontext(), logging_redirect_tqdm():
        reports = gallery.index(methods, index_spec=args.index_spec, batch_size=args.batch_size,
                                workers=args.workers, progress=not args.quiet, ray=cluster, failed=failed)
    if failed and not reports:  # nothing built: the one error, as before
        raise LensError("; ".join(why if len(failed) == 1 else f"{spec}: {why}" for spec, why in failed))
    waited = time.perf_counter() - started
    for report in reports:
        # the rate of the time shown (scan, fit, decode, embed, write), not of the embedding step alone
        speed = f", {report.embedded / report.seconds:.1f} img/s" if report.embedded and report.seconds > 0 else ""
        print(f"{report.method}: {report.count} images indexed ({report.embedded} embedded, "
              f"{report.reused} reused, {len(report.skipped)} skipped) in {report.seconds:.1f} s"
              f"{speed} -> {report.folder.parent}")
        for path, why in report.skipped:
            print(f"  skipped {path}: {why}")
    if len(reports) > 1 or reports and waited > reports[0].seconds + 1:
        print(f"done in {waited:.1f} s (models loaded, images scanned, embedded and written)")
    for spec, why in failed:
        print(f"lens: error: {spec} not indexed: {why}", file=sys.stderr)
    return 1 if failed else 0


# -- lens search -----------------------------------------------------------------------------------
SEARCH_EPILOG = """\
Many photos in one call: give several QUERY files, a folder (every image below it), or - (paths read
from stdin, one a line), mixed as you like. The gallery's index and the method's model are loaded
once, and the photos are searched in batches of --batch-size (embedded together). Output: a section
per photo, or with --json one JSON object per line (JSON lines), in input order:
  {"query": PATH, "results": [...]}               (with --detect: "objects": [{box, label, score, results}])
  {"query": PATH, "error": MESSAGE}               a photo that cannot be searched (also on stderr)
One QUERY file alone prints as before: the table, or with --json one JSON list.

Exit status: 0 when every photo was searched; 1 when any photo failed (each failure is reported and
the other photos are still searched) or for an error that stops the whole call (no index, bad
option); 2 for a usage error.
"""


def _search_parser(sub: argparse._SubParsersAction) -> Handler:
    parser = sub.add_parser(
        "search", help="find the gallery images most similar to photos (and/or words)",
        description="Find the gallery images most similar to a photo, to many photos, or to words.",
        epilog=SEARCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queries", metavar="QUERY", nargs="*",
                        help="a photo, a folder of photos, or - (photo paths on stdin); several allowed "
                             "(optional with --text)")
    parser.add_argument("--text", metavar="WORDS",
                        help="search by words ('a red dress'), or refine each QUERY photo with them ('in red'); "
                             "needs a method that reads text: clip, siglip, clip:<id or folder>")
    parser.add_argument("--text-weight", type=float, default=0.5, metavar="W",
                        help="the words' share of a photo + words query, 0-1: query = normalise((1-W) image + "
                             "W text) (default: %(default)s; see docs/text-search.md)")
    parser.add_argument("--gallery", required=True, metavar="FOLDER")
    parser.add_argument("--method", default=DEFAULT_SEARCH,
                        help="method spec, or 'auto' (default): exact matches (the 'local' index, "
                             "RANSAC-verified) first, then visually similar images (another indexed method)")
    parser.add_argument("-k", type=int, default=10, help="how many results (default: %(default)s)")
    parser.add_argument("--box", metavar="x1,y1,x2,y2",
                        help="search only this region of the query (pixels; one QUERY photo only)")
    parser.add_argument("--rerank", metavar="N|all", type=_parse_rerank,
                        help="re-rank the top N index candidates: by the method's own check (sift: "
                             "RANSAC-verified matches) or exactly with the stored vectors; 'all' "
                             "compares every gallery image (brute force); 0: off (default: the "
                             "method's or the index's setting)")
    parser.add_argument("--json", action="store_true",
                        help="one QUERY photo: a JSON list of {rank, path, score, score_kind, match} (+ inliers "
                             "and region, the query's outline in the result, for exact matches); with "
                             "--detect, a list of {box, label, score, results}, one per searched object "
                             "(box, label, score: as `lens detect --json`; null for the whole image). "
                             "Many photos: JSON lines (see below)")
    parser.add_argument("--detect", nargs="?", const="main", choices=["main", "all"],
                        help="find objects first: search the main subject (--detect or --detect main), "
                             "or every detected object, results grouped per box (--detect all)")
    parser.add_argument("--margin", type=float, default=0.05,
                        help="context added around a detected box, as a fraction of its size "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                        help="query photos decoded and embedded together (default: %(default)s)")
    _add_detector_options(parser, weights_flag="--detector-weights")
    _add_common(parser)
    return _run_search


def _run_search(args: argparse.Namespace) -> int:
    """``lens search``: one photo (the table or a JSON list), many photos (a section or a JSON line
    each; see :data:`SEARCH_EPILOG`), or words alone. Returns the exit status: 0, or 1 when a photo of
    many failed; raises :class:`LensError` for an error that stops the whole call."""
    if args.k < 1:
        raise LensError("-k must be at least 1")
    if args.batch_size < 1:
        raise LensError("--batch-size must be at least 1")
    if not args.queries and args.text is None:
        raise LensError("give a QUERY photo, --text WORDS, or both")
    if not args.queries and (args.box or args.detect):
        raise LensError("--box and --detect choose a region of a QUERY photo: give one")
    if args.box and args.detect:
        raise LensError("use either --box or --detect, not both")
    if len(args.queries) > 1 or any(q == "-" or os.path.isdir(q) for q in args.queries):
        return _search_batch(args)
    from lens.images import load_image

    query = load_image(args.queries[0]) if args.queries else None  # a bad query or box fails here,
    box = _parse_box(args.box, query.size if query is not None else None)  # before any model loads
    gallery = _gallery(args)
    if args.detect:
        _check_indexed(gallery, args.method)  # a missing index fails before the detector loads
        [groups] = _search_objects(args, gallery, _detector(args), [query])
        if args.json:
            print(json.dumps([_object_dict(box, results) for box, results in groups], indent=2))
        else:
            _print_objects(groups)
        return 0
    words = {"text": args.text, "text_weight": args.text_weight} if args.text is not None else {}
    results = gallery.search(query, args.method, k=args.k, box=box, rerank=args.rerank, **words)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        return 0
    _print_results(results)
    return 0


def _search_batch(args: argparse.Namespace) -> int:
    """Many query photos with one gallery, one model and (with --detect) one detector: decoded and
    searched --batch-size at a time (:meth:`lens.Gallery.search_many`: embedded together). A photo
    that cannot be read is reported (stderr, and a JSON line with --json) and the others still run."""
    from lens.images import load_image

    if args.box:
        raise LensError("--box is a region of one photo: give exactly one QUERY photo with it")
    gallery = _gallery(args)
    _check_indexed(gallery, args.method)  # no index: stop before reading any photo
    detector = _detector(args) if args.detect else None
    failed = total = 0
    for chunk in _batches(_query_paths(args.queries), args.batch_size):
        decoded: list[tuple[str, object]] = []  # (path, the picture or the reason it cannot be searched)
        for path in chunk:
            try:
                decoded.append((path, load_image(path)))
            except LensError as exc:
                decoded.append((path, exc))
        photos = [picture for _, picture in decoded if not isinstance(picture, LensError)]
        if not photos:
            answers = iter([])
        elif detector is not None:
            answers = iter([{"objects": groups} for groups in _search_objects(args, gallery, detector, photos)])
        else:
            answers = iter([{"results": results} for results in _search_photos(args, gallery, photos)])
        for path, picture in decoded:  # in input order
            total += 1
            if isinstance(picture, LensError):
                failed += 1
                _report_failure(args, path, picture)
            else:
                _emit(args, path, **next(answers))
        sys.stdout.flush()  # a line per photo as soon as its batch is done
    if total == 0:
        raise LensError("no query photos: the folders given hold no images and stdin gave no paths")
    if failed:
        print(f"lens: error: {failed} of {total} query photos could not be searched", file=sys.stderr)
        return 1
    return 0


def _check_indexed(gallery, method: str) -> None:
    """Raise :class:`~lens.errors.IndexNotFoundError` when ``method`` (or ``auto``) has nothing to search."""
    from lens.search import AUTO, auto_methods

    if method == AUTO:
        auto_methods(gallery.indexed_methods())
    else:
        gallery.open(method)


def _query_paths(queries: Sequence[str]) -> Iterator[str]:
    """The photo paths ``queries`` name, in order: a file as it is, a folder's images (recursive,
    sorted: :func:`lens.images.iter_image_files`), ``-``: the paths on stdin, one a line."""
    from lens.images import iter_image_files

    for query in queries:
        if query == "-":
            yield from (line.rstrip("\r\n") for line in sys.stdin if line.strip())
        elif os.path.isdir(query):
            yield from (os.fspath(path) for path in iter_image_files(query))
        else:
            yield query


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _search_photos(args: argparse.Namespace, gallery, photos: list) -> list[list]:
    """The results of each decoded photo: embedded in one batch, or one by one with --text."""
    if args.text is not None:
        return [gallery.search(photo, args.method, k=args.k, rerank=args.rerank, text=args.text,
                               text_weight=args.text_weight) for photo in photos]
    return gallery.search_many(photos, args.method, k=args.k, rerank=args.rerank)


def _search_objects(args: argparse.Namespace, gallery, detector, photos: list) -> list[list[tuple]]:
    """``search --detect``: for each photo, [(box, results)] for its main subject or every object
    (--detect all); [(None, results)] (the whole image, with a warning) when nothing is found. All
    the boxes of all the photos are searched in one batch (with --text: one by one)."""
    from lens.detect import main_subject

    per_photo = []
    for photo, boxes in zip(photos, detector.detect_many(photos)):
        if args.detect == "main":
            subject = main_subject(boxes, photo.size)
            boxes = [subject] if subject else []
        if not boxes:
            logging.getLogger("lens").warning("no object found (detector %s); searching the whole image",
                                              args.detector)
        per_photo.append(boxes or [None])
    pairs = [(photo, box) for photo, boxes in zip(photos, per_photo) for box in boxes]
    if args.text is not None:  # each box refined by the words
        found = [gallery.search(photo, args.method, k=args.k, box=box, rerank=args.rerank, margin=args.margin,
                                text=args.text, text_weight=args.text_weight) for photo, box in pairs]
    else:
        found = gallery.search_many([photo for photo, _ in pairs], args.method, k=args.k,
                                    boxes=[box for _, box in pairs], rerank=args.rerank, margin=args.margin)
    groups, start = [], 0
    for boxes in per_photo:
        groups.append(list(zip(boxes, found[start:start + len(boxes)])))
        start += len(boxes)
    return groups


def _object_dict(box, results) -> dict:
    """One searched object as JSON: the box exactly as ``lens detect --json`` gives it
    (``box`` [x1, y1, x2, y2], ``label``, ``score``; all null for the whole image) and its ``results``."""
    where = box.as_dict() if box is not None else {"box": None, "label": None, "score": None}
    return {**where, "results": [r.as_dict() for r in results]}


def _emit(args: argparse.Namespace, path: str, *, results=None, objects=None) -> None:
    """One photo of many: a JSON line with --json, else a section headed by its path."""
    from lens.images import display_path

    if args.json:
        answer = ({"objects": [_object_dict(box, found) for box, found in objects]} if objects is not None
                  else {"results": [r.as_dict() for r in results]})
        print(json.dumps({"query": path, **answer}))
        return
    print(f"query: {display_path(path)}")
    if objects is not None:
        _print_objects(objects)
    else:
        _print_results(results)
    print()


def _report_failure(args: argparse.Namespace, path: str, exc: LensError) -> None:
    print(f"lens: error: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps({"query": path, "error": str(exc)}))


def _print_results(results) -> None:
    from lens.types import SCORE_LABELS

    kinds = list(dict.fromkeys(r.kind for r in results)) or ["cosine"]
    legend = "; ".join(f"{SCORE_LABELS.get(kind, kind)}" for kind in kinds)
    marked = any(r.match == "exact" for r in results)
    print(f"{'rank':>4}  {'score':>6}  {'match  ' if marked else ''}path   (score: {legend})")
    for r in results:
        score = f"{r.score:6.0f}" if r.kind in ("inliers", "votes") else f"{r.score:6.4f}"
        match = f"{r.match:<7}" if marked else ""
        print(f"{r.rank:>4}  {score}  {match}{r.file}")


def _print_objects(groups: list[tuple]) -> None:
    for n, (box, results) in enumerate(groups, 1):
        if n > 1:
            print()
        print(_describe_box(box, n, len(groups)))
        _print_results(results)


def _describe_box(box, n: int, count: int) -> str:
    if box is None:
        return "whole image (no object found)"
    where = ",".join(f"{v:.0f}" for v in box.xyxy)
    prefix = "main subject" if count == 1 else f"object {n}/{count}"
    return f"{prefix}: {box.label} (score {box.score:.2f}) at {where}"


# -- lens detect -----------------------------------------------------------------------------------
def _add_detector_options(parser: argparse.ArgumentParser, weights_flag: str) -> None:
    from lens.detect import list_detectors

    parser.add_argument("--detector", default="yolo", choices=list_detectors(),
                        help="object detector (default: %(default)s)")
    parser.add_argument(weights_flag, dest="detector_weights", metavar="PATH",
                        help="detector weights: a local file (yolo: .pt/.onnx/.tflite; retinanet: a state "
                             "dict) or a model name (default: yolo11n.pt / torchvision COCO_V1, "
                             "downloaded on first use)")
    parser.add_argument("--conf", type=float, default=0.25,
                        help="detection score threshold (default: %(default)s)")


def _detector(args: argparse.Namespace):
    from lens.detect import create_detector

    return create_detector(args.detector, args.detector_weights, conf=args.conf)


def _detect_parser(sub: argparse._SubParsersAction) -> Handler:
    parser = sub.add_parser("detect", help="find the objects in a photo (boxes, labels, scores)")
    parser.add_argument("photo", metavar="PHOTO")
    _add_detector_options(parser, weights_flag="--weights")
    parser.add_argument("--json", action="store_true",
                        help='print a JSON list of {"box": [x1,y1,x2,y2], "label", "score"}, best first')
    return _run_detect


def _run_detect(args: argparse.Namespace) -> int:
    from lens.detect import main_subject
    from lens.images import load_image

    photo = load_image(args.photo)
    boxes = _detector(args).detect(photo)
    if args.json:
        print(json.dumps([box.as_dict() for box in boxes], indent=2))
        return 0
    if not boxes:
        print(f"no object found (detector {args.detector}, score threshold {args.conf})")
        return 0
    subject = main_subject(boxes, photo.size)
    print(f"{'#':>3}  {'score':>5}  {'label':<16} box x1,y1,x2,y2 (pixels)   * = main subject")
    for n, box in enumerate(boxes, 1):
        mark = "*" if box is subject else " "
        where = ",".join(f"{v:.0f}" for v in box.xyxy)
        print(f"{n:>2}{mark}  {box.score:5.3f}  {box.label:<16} {where}")
    return 0




def _parse_rerank(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expects a number of candidates or 'all', got '{text}'")
    return value


# -- lens methods ----------------------------------------------------------------------------------
def _methods_parser(sub: argparse._SubParsersAction) -> Handler:
    sub.add_parser("methods", help="list the similarity methods")
    return _run_methods


def _run_methods(args: argparse.Namespace) -> int:
    from lens.methods import list_methods

    print("\n".join(list_methods()))
    return 0


# -- lens eval -------------------------------------------------------------------------------------
def _eval_parser(sub: argparse._SubParsersAction) -> Handler:
    parser = sub.add_parser("eval", help="compare methods on a labelled dataset: mAP, recall, speed, size")
    parser.add_argument("dataset", metavar="DATASET",
                        help="class sub-folders (optionally train/ and test/), or images/ + groundtruth.json")
    parser.add_argument("--methods", default="all",
                        help="comma-separated methods, or 'all' (every registered method; those that "
                             "cannot load here are reported as failed)")
    parser.add_argument("--distractors", metavar="DIR[,DIR...]",
                        help="add every image under these folders to the gallery, relevant to no query "
                             "(measuring at scale, like Holidays + Flickr100k)")
    parser.add_argument("--index", dest="index_spec", metavar="SPEC", help="index backend spec for every method")
    parser.add_argument("--top", type=int, help="score only the top N results (default: the full ranking)")
    parser.add_argument("--detect", action="store_true",
                        help="the full Lens pipeline: crop each query to its detected main subject first")
    _add_detector_options(parser, weights_flag="--detector-weights")
    parser.add_argument("--max-queries", type=int, help="evaluate a seeded random sample of the queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="images per model call (default: 8 on CPU, 32 on a GPU)")
    parser.add_argument("--out", metavar="DIR", help="where the report goes (default: eval/<dataset name>)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="weights for a method (repeatable); a trainable method given a model here is "
                             "not trained again")
    parser.add_argument("--backbone", help="backbone of the trained siamese/finetune methods (default: theirs)")
    return _run_eval


def _run_eval(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from tqdm.contrib.logging import logging_redirect_tqdm

    from lens.evaluation.datasets import distractor_files, load_dataset
    from lens.evaluation.evaluate import (
        MethodResult, environment, eval_gallery, evaluate_method, load_queries, prepare_trained,
    )
    from lens.methods import list_methods
    from lens.evaluation.report import text_table, write_report

    dataset = load_dataset(args.dataset, max_queries=args.max_queries, seed=args.seed)
    methods = ([m for m in list_methods() if ":" not in m] if args.methods == "all"
               else [m.strip() for m in args.methods.split(",") if m.strip()])
    out = Path(args.out) if args.out else Path("eval") / dataset.name
    folders = [f.strip() for f in (args.distractors or "").split(",") if f.strip()]
    distractors = distractor_files(folders, dataset)
    per_folder = {folder: sum(1 for key in distractors if key.split("/")[1] == str(n))
                  for n, folder in enumerate(folders, 1)}
    print(dataset.describe() + (f"; + {len(distractors)} distractors" if folders else ""))
    detect, margin = None, 0.0
    if args.detect:
        from lens.detect import DEFAULT_MARGIN, main_subject

        detector, margin = _detector(args), DEFAULT_MARGIN

        def detect(picture):
            return main_subject(detector.detect(picture), picture.size)

    queries = load_queries(dataset, detect, margin)
    gallery = eval_gallery(dataset, out, distractors=distractors, models=parse_models(args.model))
    results = []
    with logging_redirect_tqdm():
        for method in methods:
            try:
                seen = prepare_trained(gallery, dataset, method, backbone=args.backbone, seed=args.seed)
                results.append(evaluate_method(gallery, dataset, method, queries, top=args.top,
                                               index_spec=args.index_spec, batch_size=args.batch_size,
                                               data_seen=seen))
            except LensError as exc:
                logging.getLogger("lens").warning("%s: %s", method, exc)
                results.append(MethodResult.failed(method, str(exc)))
    print(text_table(results))
    config = {"methods": methods, "top": args.top, "backbone": args.backbone, "index": args.index_spec, "detect": args.detect,
              "detector": args.detector if args.detect else None, "max_queries": args.max_queries,
              "seed": args.seed, "batch_size": args.batch_size, "models": parse_models(args.model),
              "distractors": per_folder}
    command = "lens " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = write_report(results, dataset, out, config, environment(), command,
                          gallery_files=gallery.files,
                          typed_dataset=args.dataset)
    print(f"report: {report}")
    return 0


# -- lens train -----------------------------------------------------------------------------------
def _train_parser(sub: argparse._SubParsersAction) -> Handler:
    from lens.training import get_trainer, list_trainers

    parser = sub.add_parser("train", help=f"train a method on a gallery ({', '.join(list_trainers())})")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in list_trainers():
        trainer = get_trainer(kind)
        text = trainer.summary
        p = kinds.add_parser(kind, help=text, description=f"Train the '{kind}' method: {text}.")
        p.add_argument("gallery", metavar="FOLDER", help="folder of training images (class sub-folders = labels)")
        p.add_argument("--out", metavar="DIR",
                       help=f"model folder (default: models/<gallery folder name>-<hash of its path>/{kind}, "
                            f"where `lens index/search --methods {kind}` look for it)")
        for option in trainer.options:
            p.add_argument(option.cli_flag, dest=option.name, type=option.type, default=option.default,
                           required=option.required, metavar=option.metavar, help=option.help)
        defaults = trainer.defaults
        epochs, batch_size, lr, patience = defaults.epochs, defaults.batch_size, defaults.lr, defaults.patience
        p.add_argument("--epochs", type=int, help=f"most epochs; early stopping may end sooner (default: {epochs})")
        p.add_argument("--batch-size", type=int, help=f"(default: {batch_size})")
        p.add_argument("--lr", type=float, help=f"learning rate, AdamW (default: {lr:g})")
        p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
        p.add_argument("--val-split", type=float, help="share of images held out for validation (default: 0.1)")
        p.add_argument("--patience", type=int,
                       help=f"epochs without a better validation loss before stopping; 0 = never (default: {patience})")
        p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
        p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
        p.add_argument("--workers", type=int, default=2, help="image decoding threads")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    return _run_train


def _run_train(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from lens.gallery import Gallery
    from lens.training import get_trainer

    kind = args.kind
    trainer = get_trainer(kind)
    out = Path(args.out) if args.out else Gallery(args.gallery).models_dir / kind
    common = {"resume": args.resume, "progress": not args.quiet, "workers": args.workers}
    options = {option.name: getattr(args, option.name) for option in trainer.options}
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                 "val_split": args.val_split, "patience": args.patience, "device": args.device}
    settings = replace(trainer.defaults, **{k: v for k, v in overrides.items() if v is not None})
    try:
        report = trainer.train(args.gallery, out, settings, **options, **common)
    except KeyboardInterrupt:
        print(f"lens: interrupted; finished epochs are kept in {out}: continue with the same command "
              "and --resume", file=sys.stderr)
        return 130
    fit, data = report.fit, report.manifest["data"]
    best = f"best: epoch {fit.best_epoch}, {'val' if data['val_images'] else 'train'} loss {fit.best_loss:.4f}"
    print(f"{kind}: {len(fit.history)} epochs ({best}{'; stopped early' if fit.stopped_early else ''}) "
          f"in {report.seconds:.0f} s on {report.manifest['device']} -> {out}")
    labels = f"labels from {data['labels']} ({len(data['classes'])} classes)" if data["classes"] else "no labels"
    print(f"  {data['train_images']} training + {data['val_images']} validation images, {labels}; "
          f"weights {report.weights}")
    hint = "" if args.out is None else f" --model {kind}={out}"
    print(f"  use it: lens index {args.gallery} --methods {kind}{hint}")
    return 0


COMMANDS = [_index_parser, _search_parser, _detect_parser, _methods_parser, _train_parser, _eval_parser]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """The ``lens`` argument parser and, per command name, the handler that runs it.

    A handler takes the parsed arguments and returns the exit status; it raises
    :class:`~lens.errors.LensError` for an error the user can fix (:func:`main` prints it).
    Building the parser imports no model library (torch, OpenCV, faiss, ...).
    """
    from lens.version import __version__

    parser = argparse.ArgumentParser(prog="lens", description="lens: photo in, similar images out.")
    parser.add_argument("--version", action="version", version=f"lens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers = {}
    for add in COMMANDS:
        handler = add(sub)
        handlers[list(sub.choices)[-1]] = handler
    return parser, handlers


def _os_path_output() -> None:
    """Print file names as the OS gives them: a name that is not valid UTF-8 (``caf\\xe9.png`` from
    an old disk) is written as its original bytes instead of failing with ``UnicodeEncodeError`` on a
    strict UTF-8 stdout; ``--json`` output is ASCII (such bytes as ``\\udcXX`` escapes, which
    ``os.fsencode(json.loads(...))`` turns back into the exact name)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape" if stream is sys.stdout else "backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lens`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    0: done; 1: a :class:`~lens.errors.LensError` (printed as one line, ``lens: error: ...``, on
    stderr), or with ``lens search`` of many photos, some could not be searched (each reported, the
    others searched); 130: interrupted (Ctrl-C). A usage error (an unknown option, a missing
    argument) exits with status 2 through ``SystemExit``, as argparse does; so do ``--help`` and
    ``--version`` (status 0). Results go to stdout, warnings and errors to stderr.
    """
    _os_path_output()
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="lens: warning: %(message)s")
    try:
        return handlers[args.command](args)
    except LensError as exc:
        print(f"lens: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
