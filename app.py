"""lens, the app: upload a photo, click the object you care about, see similar images.

    python app.py                                  # the sample gallery (scikit-image photos)
    python app.py --gallery ~/Pictures --methods vit,resnet50 --model vit=./weights/dinov2-small
    python app.py --detector-weights ./yolov8n_int8.tflite
    python app.py --methods clip,vit                # type words beside the photo ("in red"), or words alone

Every action calls the lens library (lens.service.LensService); this file only lays out the page.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")  # never pip-install or phone home from the server
os.environ.setdefault("YOLO_AUTOINSTALL", "0")

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from lens import Gallery, LensError, load_image  # noqa: E402
from lens.detect import Box, list_detectors  # noqa: E402
from lens.draw import draw_boxes  # noqa: E402
from lens.images import MAX_BYTES, ImageError, check_box, display_path  # noqa: E402
from lens.methods import parse_models  # noqa: E402
from lens.samples import write_sample_gallery  # noqa: E402
from lens.search import AUTO, TEXT_WEIGHT  # noqa: E402
from lens.service import LensService, Outcome  # noqa: E402
from lens.types import SCORE_LABELS, SearchResult  # noqa: E402

HERE = Path(__file__).resolve().parent
EXAMPLES = sorted(str(p) for p in (HERE / "examples").glob("*.jpg"))
DEFAULT_METHODS = "vit,resnet50,local,sift,phash"
WHOLE = "Whole image"
CSS = """
#lens-view img { cursor: crosshair; }
.lens-note { color: var(--body-text-color-subdued); font-size: 0.9em; }
"""


# -- small translations between the library and the widgets -----------------------------------------
def _choices(boxes: Sequence[Box]) -> list[str]:
    return [WHOLE] + [f"{i + 1} · {box.label} ({box.score:.2f})" for i, box in enumerate(boxes)]


def _selected(boxes: Sequence[Box], subject: str | None) -> int | None:
    choices = _choices(boxes)
    return choices.index(subject) - 1 if subject in choices and subject != WHOLE else None


def _name(path: str) -> str:
    """A result's file name for people (bytes that are not UTF-8 shown as \\xNN)."""
    return display_path(PurePosixPath(path).name)


def _box_from(value: Any) -> Box | None:
    """A box given to the API as [x1, y1, x2, y2] or as a box dict from /detect."""
    if not value:
        return None
    try:
        if isinstance(value, dict):
            box = Box.of(value["box"], str(value.get("label", "")), float(value.get("score", 1.0)))
        else:
            box = Box.of(value)
    except (KeyError, TypeError, ValueError) as exc:
        raise LensError(f"a box is [x1, y1, x2, y2] in pixels or a box from /detect, got {value!r}") from exc
    check_box(box)  # finite, x1 < x2, y1 < y2 (inside the image: checked with the image)
    return box


STATUS_ICONS = {"ready": "●", "queued": "○", "building": "◐", "failed": "✕", "missing": "–"}


def status_markdown(service: LensService) -> str:
    """Each method's state as a Markdown list, for the status panel."""
    return "\n".join(f"- {STATUS_ICONS[s.status]} **{s.name}**: {s.status}" + (f" ({s.detail})" if s.detail else "")
                     for s in service.states())


def readable(fn: Callable) -> Callable:
    """Show lens errors to the user as they are (gradio hides other exceptions' messages)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LensError as exc:
            raise gr.Error(str(exc)) from None

    return wrapper


def photo_input(**options: Any) -> gr.Image:
    """A ``gr.Image`` that hands the uploaded file to lens unopened.

    A plain ``gr.Image`` decodes uploads with PIL itself, so an unreadable file, a decompression bomb
    or an odd pixel mode fails inside Gradio with a bare "Error". Here :func:`lens.load_image` decodes
    it (EXIF orientation, every pixel mode, size limits) and says what is wrong. (The instance's
    ``preprocess`` is replaced rather than subclassed: Gradio writes a ``.pyi`` stub next to the source
    of every component subclass.)
    """
    widget = gr.Image(**options)
    decode = widget.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return payload.path
        return decode(payload)  # data: URLs (and None) as gr.Image does

    widget.preprocess = preprocess  # type: ignore[method-assign]
    return widget


def _load(file: Any) -> Image.Image:
    """Decode an upload; errors name the file as the user knows it, never the server's temporary path."""
    path = file["path"] if isinstance(file, dict) else getattr(file, "path", file)
    if isinstance(path, (str, os.PathLike)):
        return load_image(path, name=Path(path).name)
    return load_image(path)


class Handlers:
    """What each widget and endpoint does: small functions that call the service (one per event)."""

    def __init__(self, service: LensService):
        self.service = service

    def caption(self, results: Sequence[SearchResult]) -> list[tuple[str, str]]:
        items = []
        for r in results:
            mark = "exact · " if r.match == "exact" else ""
            try:
                items.append((str(self.service.thumbnail(r)), f"#{r.rank} · {mark}{r.score_text} · {_name(r.path)}"))
            except (LensError, OSError) as exc:
                gr.Warning(f"cannot show {display_path(r.path)}: {exc}")
        return items

    # -- UI events (private: the page's own) ------------------------------------------------------------
    @readable
    def on_photo(self, photo: Image.Image | str | None, detector: str, threshold: float):
        if photo is None:
            return None, [], gr.update(choices=[WHOLE], value=WHOLE), None
        try:
            image = _load(photo)
        except ImageError as exc:  # clear the previous photo's boxes and results: they would look like answers
            gr.Warning(str(exc), title="Cannot use this photo")
            return None, [], gr.update(choices=[WHOLE], value=WHOLE), None
        boxes: list[Box] = []
        try:
            boxes = self.service.detect(image, detector, threshold)
        except LensError as exc:
            gr.Warning(f"Detector unavailable ({exc}); searching the whole image.")
        if not boxes:
            gr.Info("No objects found: searching the whole image.")
        main = self.service.main_subject_index(boxes, image.size)
        subject = _choices(boxes)[main + 1] if main is not None else WHOLE
        return image, boxes, gr.update(choices=_choices(boxes), value=subject), draw_boxes(image, boxes, main)

    def on_click(self, boxes: list[Box], subject: str, event: gr.SelectData):
        x, y = event.index
        hit = self.service.box_at(boxes, x, y)
        return _choices(boxes)[hit + 1] if hit is not None else WHOLE

    @readable
    def on_search(self, image: Image.Image | None, boxes: list[Box], subject: str, method: str | None, k: int,
                  text: str | None = "", text_weight: float = TEXT_WEIGHT):
        text = (text or "").strip()
        if image is None and not text:
            return None, None, [], [], "Upload a photo or pick an example to start (or type words to search for)."
        if image is None:  # words alone
            if not method:
                return None, None, [], [], "No method is ready yet: see the status below."
            try:
                outcome = self.service.search_subject(None, method, int(k), text=text, text_weight=text_weight)
            except LensError as exc:  # e.g. no indexed method reads words: say so where results go
                return None, None, [], [], f"Words alone cannot be searched here: {exc}"
            return None, None, [], self.caption(outcome.results), _note(outcome, f"“{text}”")
        selected = _selected(boxes, subject)
        box = boxes[selected] if selected is not None else None
        view = draw_boxes(image, boxes, selected)
        crop = self.service.subject_image(image, box)  # the one crop: shown, and searched
        if not method:
            return view, crop, [], [], "No method is ready yet: see the status below."
        if method in (AUTO, "local") and not text:  # the whole photo, the box focusing: exact matches need every keypoint
            outcome = self.service.search(image, method, int(k), box)
        else:
            try:
                outcome = self.service.search_subject(crop, method, int(k), text=text or None,
                                                      text_weight=text_weight)
            except LensError as exc:
                if not text:
                    raise
                # the words cannot be used (no method reads them): the photo's results, and why
                *shown, note = self.on_search(image, boxes, subject, method, k)
                return (*shown, f"{note}. The words were left out: {exc}")
        exact = [r for r in outcome.results if r.match == "exact"]
        similar = [r for r in outcome.results if r.match != "exact"]
        what = f"*{box.label if box is not None else 'the whole image'}*" + (f" + “{text}”" if text else "")
        return view, crop, self.caption(exact), self.caption(similar), _note(outcome, what)

    @readable
    def on_compare(self, image: Image.Image | None, boxes: list[Box], subject: str, k: int):
        if image is None:
            raise gr.Error("Upload a photo first.")
        selected = _selected(boxes, subject)
        outcomes = {o.method: o for o in self.service.compare(image, int(k), boxes[selected] if selected is not None else None)}
        rows = [[o.method, round(o.seconds * 1000, 1), _name(o.results[0].path) if o.results else "",
                 o.results[0].score_text if o.results else "", o.error or ""] for o in outcomes.values()]
        galleries = [gr.update(value=self.caption(outcomes[m].results) if m in outcomes else [],
                               label=f"{m}: {outcomes[m].seconds * 1000:.0f} ms" if m in outcomes else f"{m}: not ready")
                     for m in self.service.methods]
        return [rows, *galleries]

    def on_status(self):
        ready = self.service.search_choices()
        building = any(s.status in ("queued", "building") for s in self.service.states())
        return status_markdown(self.service), gr.update(choices=ready), gr.Timer(active=building)

    def on_load(self, current: str | None):
        ready = self.service.search_choices()
        value = current if current in ready else (ready[0] if ready else None)
        return gr.update(choices=ready, value=value), status_markdown(self.service)

    # -- API endpoints (stateless, JSON; used by gradio_client and scripts) ----------------------------
    @readable
    def api_detect(self, image: gr.FileData, detector: str = "", threshold: float = 0.25) -> dict:
        picture = _load(image)
        boxes = self.service.detect(picture, detector or None, threshold)
        return {"size": list(picture.size), "boxes": [b.as_dict() for b in boxes],
                "main_subject": self.service.main_subject_index(boxes, picture.size)}

    @readable
    def api_pick(self, boxes: list[dict], x: float, y: float) -> int | None:
        return self.service.box_at([_box_from(b) for b in boxes], x, y)

    @readable
    def api_search(self, image: gr.FileData | None, method: str, k: int = 10, box: list[float] | None = None,
                   text: str = "", text_weight: float = TEXT_WEIGHT) -> dict:
        """``image`` (optional with ``text``) and/or ``text``: words to search for, or to refine the
        photo with (a method that reads text: clip, siglip); ``text_weight``: the words' share, 0-1."""
        picture = _load(image) if image is not None else None
        outcome = self.service.search(picture, method, int(k), _box_from(box), text=text, text_weight=text_weight)
        return _outcome_json(outcome)

    @readable
    def api_compare(self, image: gr.FileData, k: int = 5, box: list[float] | None = None) -> list[dict]:
        return [_outcome_json(o) for o in self.service.compare(_load(image), int(k), _box_from(box))]

    def api_methods(self) -> list[dict]:
        return [{"name": s.name, "status": s.status, "detail": s.detail} for s in self.service.states()]


def build_app(service: LensService) -> gr.Blocks:
    """The page for ``service``: layout, then events wired to :class:`Handlers`, then the JSON API."""
    gallery, on = service.gallery, Handlers(service)

    # -- layout ------------------------------------------------------------------------------------
    with gr.Blocks(title="lens: find similar images") as demo:
        gr.Markdown(
            f"# lens\nUpload a photo, **click the object** you are interested in (or keep the whole "
            f"image), and find the most similar pictures in the gallery **{gallery.name}**."
        )
        original = gr.State(None)
        boxes = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                upload = photo_input(label="Your photo", type="pil", sources=["upload", "clipboard", "webcam"],
                                  height=200, elem_id="lens-upload")
                with gr.Row():
                    words = gr.Textbox(label="Add to your search", elem_id="lens-text", scale=3,
                                       placeholder="“in red” with the photo, or words alone: “a red dress”",
                                       info="Words need a method that reads text (clip, siglip); press Enter.")
                    text_weight = gr.Slider(0.0, 1.0, value=TEXT_WEIGHT, step=0.05, label="Weight of the words",
                                            elem_id="lens-text-weight", scale=2,
                                            info="With a photo: 0 = the photo only, 1 = the words only.")
                view = gr.Image(label="Click a box to choose the subject", interactive=False,
                                elem_id="lens-view", height=420, buttons=["fullscreen"])
                subject = gr.Radio([WHOLE], value=WHOLE, label="Subject", elem_id="lens-subject")
                with gr.Accordion("Detector", open=False):
                    detector = gr.Dropdown(list_detectors(), value=service.detector, label="Detector")
                    threshold = gr.Slider(0.05, 0.95, value=0.25, step=0.05, label="Score threshold")
                if EXAMPLES:
                    gr.Examples(EXAMPLES, inputs=upload, label="Examples")
            with gr.Column(scale=7):
                with gr.Tab("Search"):
                    with gr.Row():
                        method = gr.Dropdown(service.search_choices(), label="Method", elem_id="lens-method",
                                             info="Only methods with a ready index are listed.")
                        k = gr.Slider(1, 30, value=8, step=1, label="Results (k)")
                    crop = gr.Image(label="Searching for", interactive=False, height=160)
                    info = gr.Markdown("Upload a photo or pick an example to start.", elem_id="lens-info")
                    exact = gr.Gallery(label="Exact matches (the matched outline drawn)", columns=4, height="auto",
                                       elem_id="lens-exact")
                    results = gr.Gallery(label="Visually similar", columns=4, height="auto", elem_id="lens-results")
                with gr.Tab("Compare methods"):
                    compare_button = gr.Button("Compare every ready method", variant="primary")
                    table = gr.Dataframe(headers=["method", "latency (ms)", "top result", "top score", "error"],
                                         interactive=False, elem_id="lens-compare")
                    compare_galleries = [gr.Gallery(label=m, columns=8, height=160, preview=False)
                                         for m in service.methods]
                with gr.Accordion("Methods and indexes", open=True):
                    status = gr.Markdown(status_markdown(service), elem_id="lens-status")
        timer = gr.Timer(2.0)

        search_inputs = [original, boxes, subject, method, k, words, text_weight]
        search_outputs = [view, crop, exact, results, info]
        quiet: dict[str, Any] = {"api_visibility": "private"}
        upload.change(on.on_photo, [upload, detector, threshold], [original, boxes, subject, view],
                      concurrency_limit=2, **quiet
                      ).then(on.on_search, search_inputs, search_outputs, concurrency_limit=4, **quiet)
        for trigger in (detector.change, threshold.release):
            trigger(on.on_photo, [original, detector, threshold], [original, boxes, subject, view],
                    concurrency_limit=2, **quiet
                    ).then(on.on_search, search_inputs, search_outputs, concurrency_limit=4, **quiet)
        view.select(on.on_click, [boxes, subject], subject, **quiet
                    ).then(on.on_search, search_inputs, search_outputs, concurrency_limit=4, **quiet)
        for trigger in (subject.input, method.change, k.release, words.submit, text_weight.release):
            trigger(on.on_search, search_inputs, search_outputs, concurrency_limit=4, **quiet)
        compare_button.click(on.on_compare, [original, boxes, subject, k], [table, *compare_galleries],
                             concurrency_limit=2, **quiet)
        timer.tick(on.on_status, None, [status, method, timer], **quiet)
        demo.load(on.on_load, method, [method, status], **quiet)

        gr.api(on.api_detect, api_name="detect", concurrency_limit=2)
        gr.api(on.api_pick, api_name="pick")
        gr.api(on.api_search, api_name="search", concurrency_limit=4)
        gr.api(on.api_compare, api_name="compare", concurrency_limit=2)
        gr.api(on.api_methods, api_name="methods")
    demo.queue(max_size=64, default_concurrency_limit=2)
    return demo


def _note(outcome: Outcome, what: str) -> str:
    """One search's summary for people: method, counts (exact / similar), what was searched, time and
    what each kind of score means."""
    exact = sum(r.match == "exact" for r in outcome.results)
    found = f"{exact} exact, {len(outcome.results) - exact} similar" if exact else f"{len(outcome.results)} results"
    kinds = list(dict.fromkeys(r.kind for r in outcome.results)) or ["cosine"]
    return (f"**{outcome.method}**: {found} for {what} in {outcome.seconds * 1000:.0f} ms "
            f"(score: {'; '.join(SCORE_LABELS.get(kind, kind) for kind in kinds)})")


def _outcome_json(outcome: Outcome) -> dict:
    return {
        "method": outcome.method,
        "seconds": round(outcome.seconds, 4),
        "error": outcome.error,
        # "image" (not "path": gradio_client would take the dict for a file to download); a name that
        # is not valid UTF-8 has its odd bytes as \xNN (JSON text must be valid UTF-8)
        "results": [{"rank": r.rank, "image": display_path(r.path), "score": round(r.score, 6), "score_kind": r.kind,
                     "match": r.match,
                     **({"inliers": r.inliers, "region": [[round(x, 1), round(y, 1)] for x, y in r.region or ()]}
                        if r.match == "exact" else {})}
                    for r in outcome.results],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="lens: photo in, similar images out (web app)")
    parser.add_argument("--gallery", help="folder of images to search (default: the sample gallery, "
                                          "scikit-image's photos, written to ./sample-gallery)")
    parser.add_argument("--index-dir", help="where the indexes live (default: indexes/<gallery name>-<hash of its path>)")
    parser.add_argument("--methods", default=os.environ.get("LENS_METHODS", DEFAULT_METHODS),
                        help="comma-separated methods to serve (default: %(default)s)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="weights for a method: hub id or local folder (repeatable)")
    parser.add_argument("--detector", default="yolo", choices=list_detectors())
    parser.add_argument("--detector-weights", help="detector weights file (default: the detector's own)")
    parser.add_argument("--index", dest="index_spec", metavar="SPEC",
                        help="index backend for the indexes built at start-up, e.g. faiss:HNSW32 or "
                             "milvus:http://127.0.0.1:19530 (default: annoy up to 1,000 images, else "
                             "faiss:HNSW32:efSearch=64; see docs/index-backends.md, docs/scaling-out.md)")
    parser.add_argument("--no-build", action="store_true", help="do not build missing indexes at start-up")
    parser.add_argument("--host", default=None, help="address to listen on (default: 127.0.0.1, or "
                                                    "GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or GRADIO_SERVER_PORT)")
    return parser.parse_args(argv)


def create_service(args: argparse.Namespace) -> LensService:
    root = Path(args.gallery) if args.gallery else write_sample_gallery(HERE / "sample-gallery")
    gallery = Gallery(root, args.index_dir, models=parse_models(args.model))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    service = LensService(gallery, methods, detector=args.detector, detector_weights=args.detector_weights,
                          index_spec=args.index_spec)
    service.start(background=True, build_missing=not args.no_build)
    return service


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    service = create_service(args)
    demo = build_app(service)
    demo.launch(
        server_name=args.host, server_port=args.port, css=CSS, theme=gr.themes.Soft(),
        allowed_paths=[str(service.thumbnail_dir.resolve())], max_file_size=MAX_BYTES,
    )


if __name__ == "__main__":
    main()
