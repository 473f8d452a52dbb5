"""The ``lens`` command line: ``lens index``, ``lens search``, ``lens methods``.

Every command is a thin shell over the library (:class:`lens.Gallery`); errors a user can fix are
printed as one line (``lens: error: ...``) with exit status 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from lens.errors import LensError

DEFAULT_METHODS = "resnet50"
Handler = Callable[[argparse.Namespace], int]


def _parse_models(pairs: Sequence[str]) -> dict[str, str]:
    models = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise LensError(f"--model expects NAME=PATH_OR_HUB_ID, got '{pair}'")
        models[name.strip()] = path.strip()
    return models


def _parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise LensError(f"--box expects x1,y1,x2,y2 in pixels, got '{text}'") from None
    return x1, y1, x2, y2


def _gallery(args: argparse.Namespace):
    from lens.gallery import Gallery

    return Gallery(args.gallery, args.index_dir, models=_parse_models(args.model))


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index-dir", "--out", dest="index_dir", metavar="DIR",
                        help="where the gallery's indexes live (default: indexes/<gallery folder name>)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="weights for a method: a hub id or a local folder, e.g. "
                             "resnet50=./weights/resnet-50 (repeatable)")


# -- lens index ------------------------------------------------------------------------------------
def _index_parser(sub: argparse._SubParsersAction) -> Handler:
    parser = sub.add_parser("index", help="embed every image of a folder and build per-method indexes")
    parser.add_argument("gallery", metavar="FOLDER", help="folder of images (searched recursively)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated method specs (default: {DEFAULT_METHODS}); see `lens methods`")
    parser.add_argument("--index", dest="index_spec", metavar="SPEC",
                        help="index backend spec (default: annoy, or what the previous build used): "
                             "annoy, annoy:trees=100, faiss:Flat, faiss:HNSW32:efSearch=64, "
                             "faiss:IVF256,PQ16:nprobe=16, faiss:PQ32:rerank=100, lsh:256:rerank=100 "
                             "(see docs/index-backends.md)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(parser)
    return _run_index


def _run_index(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    gallery = _gallery(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise LensError("--methods is empty")
    with logging_redirect_tqdm():
        reports = gallery.index(methods, index_spec=args.index_spec, batch_size=args.batch_size,
                                workers=args.workers, progress=not args.quiet)
    for report in reports:
        speed = f", {report.images_per_second:.1f} img/s" if report.embedded else ""
        print(f"{report.method}: {report.count} images indexed ({report.embedded} embedded, "
              f"{report.reused} reused, {len(report.skipped)} skipped) in {report.seconds:.1f} s"
              f"{speed} -> {report.folder.parent}")
        for path, why in report.skipped:
            print(f"  skipped {path}: {why}")
    return 0


# -- lens search -----------------------------------------------------------------------------------
def _search_parser(sub: argparse._SubParsersAction) -> Handler:
    parser = sub.add_parser("search", help="find the gallery images most similar to a photo")
    parser.add_argument("query", metavar="QUERY_IMAGE")
    parser.add_argument("--gallery", required=True, metavar="FOLDER")
    parser.add_argument("--method", default=DEFAULT_METHODS, help="method spec (default: %(default)s)")
    parser.add_argument("-k", type=int, default=10, help="how many results (default: %(default)s)")
    parser.add_argument("--box", metavar="x1,y1,x2,y2", help="search only this region of the query (pixels)")
    parser.add_argument("--rerank", metavar="N|all", type=_parse_rerank,
                        help="re-rank the top N index candidates: by the method's own check (sift: "
                             "RANSAC-verified matches) or exactly with the stored vectors; 'all' "
                             "compares every gallery image (brute force); 0: off (default: the "
                             "method's or the index's setting)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {rank, path, score}")
    _add_common(parser)
    return _run_search


def _run_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise LensError("-k must be at least 1")
    from lens.images import load_image

    query = load_image(args.query)  # a bad query fails here, before any model loads
    gallery = _gallery(args)
    results = gallery.search(query, args.method, k=args.k, box=_parse_box(args.box), rerank=args.rerank)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        return 0
    kind = results[0].kind if results else "cosine"
    print(f"{'rank':>4}  {'score':>6}  path   (score: {SCORE_LABELS.get(kind, kind)})")
    for r in results:
        print(f"{r.rank:>4}  {r.score:6.4f}  {r.file}" if kind != "inliers" else
              f"{r.rank:>4}  {r.score:6.0f}  {r.file}")
    return 0


SCORE_LABELS = {
    "cosine": "cosine similarity, 1 = identical",
    "hamming": "1 - Hamming distance / bits, 1 = identical",
    "inliers": "RANSAC-verified keypoint matches (inliers), more = more alike",
}


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


COMMANDS = [_index_parser, _search_parser, _methods_parser]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    from lens import __version__

    parser = argparse.ArgumentParser(prog="lens", description="lens: photo in, similar images out.")
    parser.add_argument("--version", action="version", version=f"lens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers = {}
    for add in COMMANDS:
        handler = add(sub)
        handlers[list(sub.choices)[-1]] = handler
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
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
