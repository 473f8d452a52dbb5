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
import html
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")  # never pip-install or phone home from the server
os.environ.setdefault("YOLO_AUTOINSTALL", "0")

import gradio as gr  # noqa: E402
from gradio_image_annotation import image_annotator  # noqa: E402
from PIL import Image, ImageColor  # noqa: E402

from lens import Gallery, LensError, load_image  # noqa: E402
from lens.detect import Box, list_detectors  # noqa: E402
from lens.draw import PALETTE, draw_boxes  # noqa: E402
from lens.images import MAX_BYTES, MIN_REGION, ImageError, changed_box, check_box, display_path  # noqa: E402
from lens.methods import parse_models, reads_words, short_name  # noqa: E402
from lens.samples import write_sample_gallery  # noqa: E402
from lens.search import AUTO, TEXT_WEIGHT  # noqa: E402
from lens.service import LensService, Outcome  # noqa: E402
from lens.types import SCORE_LABELS, SearchResult  # noqa: E402

HERE = Path(__file__).resolve().parent
EXAMPLES = sorted(str(p) for p in (HERE / "examples").glob("*.jpg"))
DEFAULT_METHODS = "vit,resnet50,local,sift,phash"
WHOLE = "Whole image"
REGION = "✎ "  #: the Subject choice of the user's own region starts with this
PICK = "Click: a box, or the area around the click"
ADJUST = "Draw or adjust a region"
HINT = (f"Click a box to search it, or anywhere else to search the area around the click. "
        f"To drag a region yourself, or move and resize a box, choose **{ADJUST}**; or type its corners "
        f"under *Region in pixels*.")
ADJUST_HINT = ("**Draw** (the box button under the photo, or key C; it opens so): press, drag and release over "
               "what you want searched. **Move or resize** (the hand button, or key D): drag a box, or its corner and edge "
               "handles. Each release searches that region.")
#: On opening *Draw or adjust*, the editor starts in its Draw mode (it would start in its Move mode,
#: where a drag beside the boxes pans the photo): its own "Create box" button, once it is shown.
DRAW_FIRST = f"""(tool) => {{
    if (tool !== {ADJUST!r}) return;
    const start = Date.now();
    const press = () => {{
        const button = document.querySelector('#lens-annotate button[aria-label="Create box"]');
        if (button) button.click(); else if (Date.now() - start < 5000) setTimeout(press, 100);
    }};
    press();
}}"""
CSS = """
.lens-note { color: var(--body-text-color-subdued); font-size: 0.9em; }
/* result grids: as many columns as fit (never a fixed 4 or 8 that overflow a phone), captions in full */
.lens-grid .grid-container { grid-template-columns: repeat(auto-fill, minmax(min(100%, 128px), 1fr)) !important;
                             grid-template-rows: none !important; grid-auto-rows: auto !important; }
.lens-grid .thumbnail-item { height: auto !important; }
.lens-grid .caption-label { white-space: normal !important; overflow-wrap: anywhere; max-width: 100% !important;
                            left: 0; opacity: 0.92 !important; font-size: 0.78em; line-height: 1.25; }
#lens-compare { max-width: 100%; overflow-x: auto; }
#lens-compare table { table-layout: auto; }
.lens-grid .grid-wrap { height: auto !important; min-height: 0 !important; max-height: none !important;
                        overflow: visible !important; }
.lens-grid { height: auto !important; max-height: none !important; }
#lens-exact:not(:has(img)) { display: none; }  /* no exact match: no empty row */
/* the photo as tall as it is shown (no empty bands in a narrow column), so results start sooner */
#lens-view, #lens-view .image-container, #lens-view button, #lens-view .image-frame { height: auto !important; }
#lens-view img { cursor: crosshair; max-height: 420px; }
@media (max-width: 640px) { #lens-view img { max-height: 360px; } }
#lens-status pre { white-space: pre-wrap; word-break: break-word; }  /* a failure's details wrap */
#lens-annotate canvas { touch-action: none; }  /* a finger drags the box, not the page */
#lens-annotate button[aria-label^="Rotate"] { display: none; }  /* the photo is searched as it is */
"""


# -- small translations between the library and the widgets -----------------------------------------
def _choices(boxes: Sequence[Box], region: Box | None = None) -> list[str]:
    mine = [_region_choice(region)] if region is not None else []
    return [WHOLE] + [f"{i + 1} · {box.label} ({box.score:.2f})" for i, box in enumerate(boxes)] + mine


def _chosen(boxes: Sequence[Box], region: Box | None, choice: str) -> tuple[str, dict]:
    """The Subject ``choice`` twice: for the page's state (what searches read) and for the menu (what
    people see). Searches read the state, kept on the server: it changes in the same event as the photo
    and its boxes, where the menu's value, sent by the browser, could be the previous photo's."""
    return choice, gr.update(choices=_choices(boxes, region), value=choice)


def _region_choice(region: Box) -> str:
    return f"{REGION}{region.label}: {_corners(region)}"


def _corners(box: Box) -> str:
    return ", ".join(f"{v:.0f}" for v in box.xyxy)


def _subject(boxes: Sequence[Box], region: Box | None, subject: str | None) -> tuple[Box | None, int | None]:
    """The box a Subject choice names, and its position in ``boxes`` (None: the user's region or the
    whole image)."""
    if region is not None and subject == _region_choice(region):
        return region, None
    choices = _choices(boxes)
    if subject in choices and subject != WHOLE:
        i = choices.index(subject) - 1
        return boxes[i], i
    return None, None


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


def _method_choices(specs: Sequence[str]) -> list[tuple[str, str]]:
    """The method menu: short names shown (``efficientnet_lite0.in1k``), full specs as the values."""
    return [(short_name(spec), spec) for spec in specs]


STATUS_ICONS = {"ready": "●", "queued": "○", "building": "◐", "failed": "✕", "missing": "–"}


def status_markdown(service: LensService) -> str:
    """Each method's state for the status panel, as one HTML list (Markdown passes it through): one
    line each, a failure's details folded away, the full spec beside a shortened name.

    HTML, not a Markdown list: a failure's folded details (a code block inside a list item) ended
    the Markdown list, and every method after it showed as raw text. No blank line inside, which
    would end the HTML block the same way."""
    items = []
    for s in service.states():
        name = short_name(s.name)
        spec = f" <span class='lens-note'>{html.escape(s.name)}</span>" if name != s.name else ""
        head = f"{STATUS_ICONS[s.status]} <b>{html.escape(name)}</b>{spec}: {s.status}"
        detail = "\n".join(line for line in s.detail.strip().splitlines() if line.strip())
        first = detail.splitlines()[0] if detail else ""
        if s.status == "failed" and detail:
            short = first if len(first) <= 100 else first[:99] + "…"
            folded = (f"<details><summary>details</summary><pre>{html.escape(detail)}</pre></details>"
                      if detail != short else "")
            items.append(f"<li>{head} ({html.escape(short)}){folded}</li>")
        else:
            items.append(f"<li>{head}" + (f" ({html.escape(detail)})" if detail else "") + "</li>")
    return "<ul>\n" + "\n".join(items) + "\n</ul>"


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


def _editor_boxes(boxes: Sequence[Box], region: Box | None) -> list[dict]:
    """The boxes the editor starts with: the detected ones, numbered and coloured as on the photo,
    and the user's region (pixels rounded: the editor works in whole pixels)."""
    shown = [(f"{i + 1} {box.label}", box, ImageColor.getrgb(PALETTE[i % len(PALETTE)])) for i, box in enumerate(boxes)]
    shown += [(region.label, region, (255, 255, 255))] if region is not None else []
    # colours as the browser's editor writes them, "rgb(r, g, b)": it sends them back as they came,
    # and the component's parser raised TypeError on every release for a colour sent as a tuple
    return [{"xmin": round(box.x1), "ymin": round(box.y1), "xmax": round(box.x2), "ymax": round(box.y2),
             "label": label, "color": "rgb({}, {}, {})".format(*colour)} for label, box, colour in shown]


def _xyxy(boxes: Sequence[dict]) -> list[tuple[float, float, float, float]]:
    return [(b["xmin"], b["ymin"], b["xmax"], b["ymax"]) for b in boxes]


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
        self._lock = threading.Lock()
        self._last_upload: dict[str, str | None] = {}  # page (session) -> the upload it last handled

    def caption(self, results: Sequence[SearchResult]) -> list[tuple[str, str]]:
        """Gallery items: (thumbnail, ``#rank · score · path relative to the gallery``)."""
        items = []
        for r in results:
            mark = "exact · " if r.match == "exact" else ""
            try:
                items.append((str(self.service.thumbnail(r)),
                              f"#{r.rank} · {mark}{r.score_text} · {display_path(r.path)}"))
            except (LensError, OSError) as exc:
                gr.Warning(f"cannot show {display_path(r.path)}: {exc}", duration=8)
        return items

    # -- UI events (private: the page's own) ------------------------------------------------------------
    @readable
    def on_photo(self, photo: Image.Image | str | None, detector: str, threshold: float):
        """A new photo (or detector settings): (photo, boxes, region, Subject chosen, Subject menu, view,
        hint)."""
        empty = (None, [], None, *_chosen([], None, WHOLE), None, HINT)
        if photo is None:
            return empty
        try:
            image = _load(photo)
        except ImageError as exc:  # clear the previous photo's boxes and results: they would look like answers
            gr.Warning(str(exc), title="Cannot use this photo", duration=8)
            return empty
        boxes: list[Box] = []
        found = ""
        try:
            boxes = self.service.detect(image, detector, threshold)
        except LensError as exc:  # said beside the photo, not in a toast over the results
            found = f"The detector is unavailable ({exc}). "
        if not boxes:
            found += "No objects found: searching the whole image. "
        else:
            found = f"{len(boxes)} object{'s' if len(boxes) > 1 else ''} found. "
        main = self.service.main_subject_index(boxes, image.size)
        subject = _choices(boxes)[main + 1] if main is not None else WHOLE
        return (image, boxes, None, *_chosen(boxes, None, subject),
                draw_boxes(image, boxes, main), found + HINT)

    def on_upload(self, photo: Image.Image | str | None, detector: str, threshold: float, request: gr.Request):
        """:meth:`on_photo` for the upload widget, once per file and page: replacing a photo fires the
        widget's change event twice with the same file (Gradio 6), which showed each warning twice."""
        page = getattr(request, "session_hash", None) or ""
        with self._lock:
            repeated = isinstance(photo, str) and self._last_upload.get(page) == photo
            self._last_upload[page] = photo if isinstance(photo, str) else None
            while len(self._last_upload) > 1000:  # pages long closed
                self._last_upload.pop(next(iter(self._last_upload)))
        if repeated:  # an error nobody sees: the search chained after this event does not run again
            raise gr.Error("the same upload again", visible=False, print_exception=False)
        return self.on_photo(photo, detector, threshold)

    def on_click(self, image: Image.Image | None, boxes: list[Box], region: Box | None, event: gr.SelectData):
        """A click on the photo: (region, Subject chosen, Subject menu, hint). Picks the smallest box
        under the click, or the area around the click."""
        if image is None:
            return region, gr.skip(), gr.skip(), gr.skip()
        x, y = (float(v) for v in event.index)
        hit, box = self.service.subject_at(boxes, x, y, image.size)
        if hit is not None:
            return region, *_chosen(boxes, region, _choices(boxes)[hit + 1]), HINT
        return (box, *_chosen(boxes, box, _region_choice(box)),
                f"No detected object at ({x:.0f}, {y:.0f}): searching the region around the click "
                f"({_corners(box)}). To drag your own region, or resize this one, choose **{ADJUST}**.")

    @readable
    def on_click_search(self, image: Image.Image | None, boxes: list[Box], region: Box | None, method: str | None,
                        k: float | int, text: str | None, text_weight: float, event: gr.SelectData):
        """A click on the photo and its search, as one event (:meth:`on_click`'s four outputs, then
        :meth:`on_search`'s eight). One event, run for the latest click only (``always_last``): with a
        click and its search as two chained events, quick clicks ran several searches at once and an
        earlier one could land last, leaving the Subject on one box and the results of another."""
        picked = self.on_click(image, boxes, region, event)
        if image is None:
            return (*picked, *(gr.skip() for _ in range(8)))
        return (*picked, *self.on_search(image, boxes, picked[0], picked[1], method, k, text, text_weight))

    def on_tool(self, tool: str, image: Image.Image | None, boxes: list[Box], region: Box | None):
        """The tool for the photo: (photo shown, box editor, the editor's boxes, hint). *Draw or adjust*
        swaps the photo for the box editor, holding the detected boxes and the current region."""
        if tool != ADJUST or image is None:  # back to clicking: the editor's hint goes
            return gr.update(visible=True), gr.update(visible=False), [], HINT
        shown = _editor_boxes(boxes, region)
        return (gr.update(visible=False), gr.update(value={"image": image, "boxes": shown}, visible=True),
                _xyxy(shown), ADJUST_HINT)

    def on_adjust(self, image: Image.Image | None, boxes: list[Box], edited: list, value: dict | None):
        """A release in the box editor: (region, the editor's boxes, Subject chosen, Subject menu, hint,
        searched?). The box drawn, moved or resized (:func:`lens.images.changed_box`) becomes the
        region searched; a release that changed nothing (a click, a box just started or removed), or a
        box wholly beside the photo, searches nothing."""
        after = _xyxy((value or {}).get("boxes") or [])
        changed = changed_box(edited or [], after) if image is not None else None
        if changed is None:
            return gr.skip(), after, gr.skip(), gr.skip(), gr.skip(), False
        try:
            region = self.service.region(changed, image.size)
        except ImageError as exc:  # drawn in the margin beside the photo
            return gr.skip(), after, gr.skip(), gr.skip(), f"Nothing searched: {exc}. " + ADJUST_HINT, False
        return (region, after, *_chosen(boxes, region, _region_choice(region)),
                f"Your region {_corners(region)} is searched. " + ADJUST_HINT, True)

    def after_adjust(self, searched: bool, *search: Any):
        """The search after a release in the box editor, when it drew or changed a box."""
        if not searched:
            return tuple(gr.skip() for _ in range(8))
        return self.on_search(*search)

    @readable
    def on_region(self, image: Image.Image | None, boxes: list[Box], text: str):
        """Corners typed as ``x1, y1, x2, y2``: (region, Subject chosen, Subject menu, hint)."""
        if image is None:
            raise LensError("Upload a photo first.")
        try:
            corners = Box.of((text or "").replace(",", " ").split())
        except ValueError:
            raise LensError(f"a region is four numbers x1, y1, x2, y2 in pixels, got '{text}'") from None
        region = self.service.region(corners, image.size)
        return (region, *_chosen(boxes, region, _region_choice(region)),
                f"Your region {_corners(region)} is searched.")

    @readable
    def on_search(self, image: Image.Image | None, boxes: list[Box], region: Box | None, subject: str,
                  method: str | None, k: float | int, text: str | None = "", text_weight: float = TEXT_WEIGHT):
        """(view, searched crop, exact matches, similar, note, results shown, region corners, opened)."""
        text = (text or "").strip()
        closed = gr.update(visible=False)
        if image is None and not text:
            return None, None, [], [], "Upload a photo or pick an example to start (or type words to search for).", [], "", closed
        try:
            k = self.service.check_k(k)
        except LensError as exc:  # a field to correct: said, and the page kept as it is
            gr.Warning(str(exc))
            return tuple(gr.skip() for _ in range(8))
        if image is None:  # words alone
            if not method:
                return None, None, [], [], "No method is ready yet: see the status below.", [], "", closed
            try:
                outcome = self.service.search_subject(None, method, k, text=text, text_weight=text_weight)
            except LensError as exc:  # e.g. no indexed method reads words: say so where results go
                return None, None, [], [], f"Words alone cannot be searched here: {exc}", [], "", closed
            return (None, None, [], self.caption(outcome.results), _note(outcome, f"“{text}”"),
                    _found(outcome.results), "", closed)
        box, selected = _subject(boxes, region, subject)
        view = draw_boxes(image, boxes, selected, region=box if selected is None else None)
        crop = self.service.subject_image(image, box)  # the one crop: shown, and searched
        corners = _corners(box) if box is not None else ""
        if not method:
            return view, crop, [], [], "No method is ready yet: see the status below.", [], corners, closed
        if method in (AUTO, "local") and not text:  # the whole photo, the box focusing: exact matches need every keypoint
            outcome = self.service.search(image, method, k, box)
        else:
            try:
                outcome = self.service.search_subject(crop, method, k, text=text or None, text_weight=text_weight)
            except LensError as exc:
                if not text:
                    raise
                # the words cannot be used (no method reads them): the photo's results, and why
                *shown, note, found, corners, opened = self.on_search(image, boxes, region, subject, method, k)
                return (*shown, f"{note}. The words were left out: {exc}", found, corners, opened)
        exact = [r for r in outcome.results if r.match == "exact"]
        similar = [r for r in outcome.results if r.match != "exact"]
        name = box.label if box is not None else "the whole image"
        what = f"*{name}*" + (f" ({corners})" if box is not None and selected is None else "")
        what += f" + “{text}”" if text else ""
        return (view, crop, self.caption(exact), self.caption(similar), _note(outcome, what),
                _found(exact) + _found(similar), corners, closed)

    def on_open_exact(self, found: list[dict], event: gr.SelectData):
        return self.on_open(found, event.index)

    def on_open_similar(self, found: list[dict], event: gr.SelectData):
        return self.on_open(found, sum(f["match"] == "exact" for f in found) + event.index)

    def on_open(self, found: list[dict], at: int):
        """The result at position ``at`` of those shown: (the panel shown, the original picture, its
        download, its rank, score and path relative to the gallery)."""
        if not (0 <= at < len(found)):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        shown = found[at]
        result = SearchResult(path=shown["path"], score=shown["score"], rank=shown["rank"], file=Path(shown["file"]),
                              kind=shown["kind"], match=shown["match"])
        try:
            original = str(self.service.openable(result))
        except LensError as exc:
            raise gr.Error(str(exc)) from None
        caption = (f"**#{result.rank}** · score {result.score_text} ({SCORE_LABELS.get(result.kind, result.kind)})  \n"
                   f"`{display_path(result.path)}`")
        return (gr.update(visible=True), gr.update(value=original, label=_name(result.path)),
                gr.update(value=original, label=f"Download {_name(result.path)}"), caption)

    @readable
    def on_compare(self, image: Image.Image | None, boxes: list[Box], region: Box | None, subject: str, k: float):
        if image is None:
            raise gr.Error("Upload a photo first.")
        box, _ = _subject(boxes, region, subject)
        outcomes = {o.method: o for o in self.service.compare(image, self.service.check_k(k), box)}
        rows = [[short_name(o.method), round(o.seconds * 1000), _name(o.results[0].path) if o.results else "",
                 o.results[0].score_text if o.results else "", (o.error or "").splitlines()[0] if o.error else ""]
                for o in outcomes.values()]
        galleries = [gr.update(value=self.caption(outcomes[m].results) if m in outcomes else [],
                               label=f"{short_name(m)}: {outcomes[m].seconds * 1000:.0f} ms" if m in outcomes
                               else f"{short_name(m)}: not ready")
                     for m in self.service.methods]
        return [rows, *galleries]

    def on_method(self, method: str | None):
        """The method menu's note: the chosen method's full spec (the menu shows short names)."""
        return gr.update(info=f"{method}" if method and short_name(method) != method
                         else "Only methods with a ready index are listed.")

    def on_status(self, current: str | None = None):
        ready = self.service.search_choices()
        building = any(s.status in ("queued", "building") for s in self.service.states())
        size = self.service.gallery_size()
        value = current if current in ready else (ready[0] if ready else None)  # the first ready, once one is
        return (status_markdown(self.service), gr.update(choices=_method_choices(ready), value=value),
                gr.update(maximum=size or None), gr.Timer(active=building))

    def on_load(self, current: str | None):
        """A page (re)load: (method menu, status, k), as :meth:`on_status` gives them."""
        status, menu, k, _ = self.on_status(current)
        return menu, status, k

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
        photo with (a method that reads text: clip, siglip); ``text_weight``: the words' share, 0-1.
        ``box``: any region [x1, y1, x2, y2] in pixels (a detected box or one of your own)."""
        picture = _load(image) if image is not None else None
        outcome = self.service.search(picture, method, self.service.check_k(k), _box_from(box), text=text,
                                      text_weight=text_weight)
        return _outcome_json(outcome)

    @readable
    def api_compare(self, image: gr.FileData, k: int = 5, box: list[float] | None = None) -> list[dict]:
        return [_outcome_json(o) for o in self.service.compare(_load(image), self.service.check_k(k), _box_from(box))]

    def api_methods(self) -> list[dict]:
        return [{"name": s.name, "status": s.status, "detail": s.detail} for s in self.service.states()]


def _found(results: Sequence[SearchResult]) -> list[dict]:
    """What a results grid shows, kept to open a result later (JSON-ready)."""
    return [{"path": r.path, "file": str(r.file), "score": r.score, "rank": r.rank, "kind": r.kind, "match": r.match}
            for r in results]


def build_app(service: LensService, examples: Sequence[str] | None = None) -> gr.Blocks:
    """The page for ``service``: layout, then events wired to :class:`Handlers`, then the JSON API.
    ``examples``: photos offered to try (default: lens's own example photos)."""
    gallery, on = service.gallery, Handlers(service)
    examples = list(examples) if examples is not None else EXAMPLES
    size = service.gallery_size()

    # -- layout ------------------------------------------------------------------------------------
    with gr.Blocks(title="lens: find similar images") as demo:
        gr.Markdown(
            f"# lens\nUpload a photo, **click the object** you are interested in (or any area, or drag a "
            f"region), and find the most similar pictures in the gallery **{gallery.name}**."
        )
        original = gr.State(None)
        boxes = gr.State([])
        region = gr.State(None)
        edited = gr.State([])  # the box editor's boxes at its last release, (x1, y1, x2, y2) each
        searched = gr.State(False)  # whether that release drew or changed a box
        found = gr.State([])
        chosen = gr.State(WHOLE)  # the Subject chosen: what searches read (see _chosen)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=300):
                upload = photo_input(label="Your photo", type="pil", sources=["upload", "clipboard", "webcam"],
                                  height=200, elem_id="lens-upload")
                tool = gr.Radio([PICK, ADJUST], value=PICK, label="On the photo", elem_id="lens-tool")
                view = gr.Image(show_label=False, interactive=False,  # no label badge over the boxes' tags
                                elem_id="lens-view", height=420, buttons=["fullscreen"])
                # the box editor of "Draw or adjust": the photo with the detected boxes and the region,
                # each movable and resizable by its handles, new ones drawn by dragging (mouse, pen, touch);
                # its value's boxes are in image pixels
                editor = image_annotator(value=None, visible=False, show_label=False, elem_id="lens-annotate",
                                         height=420, disable_edit_boxes=True, boxes_alpha=0.12, handle_size=14,
                                         box_min_size=MIN_REGION, sources=[], image_type="filepath",
                                         show_download_button=False, show_clear_button=False,
                                         show_remove_button=False, use_default_label=True)
                hint = gr.Markdown(HINT, elem_id="lens-hint", elem_classes="lens-note")
                subject = gr.Radio([WHOLE], value=WHOLE, label="Subject", elem_id="lens-subject")
                # below the photo, folded unless a served method reads words
                with gr.Accordion("Add words to your search", open=any(map(reads_words, service.methods))):
                    words = gr.Textbox(show_label=False, elem_id="lens-text", lines=1,
                                       placeholder="“in red” with the photo, or words alone: “a red dress”",
                                       info="Words need a method that reads text (clip, siglip); press Enter.")
                    text_weight = gr.Slider(0.0, 1.0, value=TEXT_WEIGHT, step=0.05, label="Weight of the words",
                                            elem_id="lens-text-weight",
                                            info="With a photo: 0 = the photo only, 1 = the words only.")
                with gr.Accordion("Region in pixels", open=False):
                    corners = gr.Textbox(label="x1, y1, x2, y2", elem_id="lens-corners",
                                         info="The searched region's corners: edit them and press Enter.")
                with gr.Accordion("Detector", open=False):
                    detector = gr.Dropdown(list_detectors(), value=service.detector, label="Detector")
                    threshold = gr.Slider(0.05, 0.95, value=0.25, step=0.05, label="Score threshold")
                if examples:
                    gr.Examples(examples, inputs=upload, label="Examples", examples_per_page=8)
            with gr.Column(scale=7, min_width=300):
                with gr.Tab("Search"):
                    with gr.Row():
                        method = gr.Dropdown(_method_choices(service.search_choices()), label="Method",
                                             elem_id="lens-method", scale=3, min_width=160,
                                             info="Only methods with a ready index are listed.")
                        k = gr.Number(8, minimum=1, maximum=size or None, precision=0, step=1, label="Results (k)",
                                      elem_id="lens-k", scale=1, min_width=100, info="1 to the gallery's size; Enter")
                    crop = gr.Image(label="Searching for", interactive=False, height=160)
                    info = gr.Markdown("Upload a photo or pick an example to start.", elem_id="lens-info")
                    with gr.Group(visible=False, elem_id="lens-opened") as opened:
                        opened_image = gr.Image(interactive=False, height=320, buttons=["download", "fullscreen"],
                                                elem_id="lens-opened-image")
                        opened_note = gr.Markdown(elem_id="lens-opened-note")
                        download = gr.DownloadButton("Download the original", elem_id="lens-download", size="sm")
                    exact = gr.Gallery(label="Exact matches (the matched outline drawn)", columns=4, height="auto",
                                       elem_id="lens-exact", elem_classes="lens-grid", allow_preview=False)
                    results = gr.Gallery(label="Visually similar (click one to open it)", columns=4, height="auto",
                                         elem_id="lens-results", elem_classes="lens-grid", allow_preview=False)
                with gr.Tab("Compare methods", elem_id="lens-compare-tab"):
                    compare_button = gr.Button("Compare every ready method", variant="primary",
                                               elem_id="lens-compare-button")
                    table = gr.Dataframe(headers=["method", "ms", "top result", "top score", "error"],
                                         interactive=False, wrap=True, elem_id="lens-compare",
                                         column_widths=["28%", "12%", "28%", "14%", "18%"])
                    compare_galleries = [gr.Gallery(label=short_name(m), columns=8, height="auto", preview=False,
                                                    allow_preview=False, elem_classes="lens-grid")
                                         for m in service.methods]
                with gr.Accordion("Methods and indexes", open=True):
                    status = gr.Markdown(status_markdown(service), elem_id="lens-status")
        timer = gr.Timer(2.0)

        search_inputs = [original, boxes, region, chosen, method, k, words, text_weight]
        search_outputs = [view, crop, exact, results, info, found, corners, opened]
        photo_outputs = [original, boxes, region, chosen, subject, view, hint]
        tool_io = ([tool, original, boxes, region], [view, editor, edited, hint])
        quiet: dict[str, Any] = {"api_visibility": "private"}
        # a new photo: the previous photo's toasts go (they would be stale)
        upload.change(None, js="() => document.querySelectorAll('.toast-close').forEach(b => b.click())", **quiet)
        photo = upload.change(on.on_upload, [upload, detector, threshold], photo_outputs, concurrency_limit=2, **quiet)
        photo.success(on.on_search, search_inputs, search_outputs, concurrency_limit=4, **quiet)
        photo.success(on.on_tool, *tool_io, **quiet)  # the box editor, when it is open, gets the new photo
        for trigger in (detector.change, threshold.release):
            redetect = trigger(on.on_photo, [original, detector, threshold], photo_outputs, concurrency_limit=2, **quiet)
            redetect.then(on.on_search, search_inputs, search_outputs, concurrency_limit=4, **quiet)
            redetect.then(on.on_tool, *tool_io, **quiet)
        view.select(on.on_click_search, [original, boxes, region, method, k, words, text_weight],
                    [region, chosen, subject, hint, *search_outputs], trigger_mode="always_last", concurrency_limit=4,
                    show_progress="minimal", **quiet)
        tool.change(on.on_tool, *tool_io, **quiet).then(None, tool, None, js=DRAW_FIRST, **quiet)
        # each release of a drag in the box editor (its change event); the latest one wins
        editor.change(on.on_adjust, [original, boxes, edited, editor], [region, edited, chosen, subject, hint, searched],
                      trigger_mode="always_last", show_progress="hidden", **quiet
                      ).then(on.after_adjust, [searched, *search_inputs], search_outputs, concurrency_limit=4,
                             show_progress="minimal", **quiet)
        typed = corners.submit(on.on_region, [original, boxes, corners], [region, chosen, subject, hint], **quiet)
        typed.success(on.on_search, search_inputs, search_outputs, concurrency_limit=4, **quiet)
        typed.success(on.on_tool, *tool_io, **quiet)  # the box editor, when it is open, shows the typed region
        subject.input(lambda choice: choice, subject, chosen, **quiet
                      ).then(on.on_search, search_inputs, search_outputs, concurrency_limit=4, **quiet)
        for trigger in (method.change, k.submit, words.submit, text_weight.release):
            trigger(on.on_search, search_inputs, search_outputs, concurrency_limit=4, **quiet)
        method.change(on.on_method, method, method, **quiet)
        open_outputs = [opened, opened_image, download, opened_note]
        exact.select(on.on_open_exact, found, open_outputs, **quiet)
        results.select(on.on_open_similar, found, open_outputs, **quiet)
        compare_button.click(on.on_compare, [original, boxes, region, chosen, k], [table, *compare_galleries],
                             concurrency_limit=2, **quiet)
        timer.tick(on.on_status, method, [status, method, k, timer], **quiet)
        demo.load(on.on_load, method, [method, status, k], **quiet)

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
    similar = len(outcome.results) - exact
    # an exact match is the same item seen anywhere in the photo (outlined in its picture), not
    # necessarily the chosen subject: say which count is about the subject
    found = (f"{exact} exact match{'es' if exact > 1 else ''} in the photo (outlined), {similar} similar to {what}"
             if exact else f"{len(outcome.results)} results for {what}")
    kinds = list(dict.fromkeys(r.kind for r in outcome.results)) or ["cosine"]
    return (f"**{short_name(outcome.method)}**: {found} in {outcome.seconds * 1000:.0f} ms "
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


def served_folders(service: LensService) -> list[str]:
    """The folders the app serves files from (Gradio's ``allowed_paths``): the thumbnails (with the
    copies of linked originals, :meth:`LensService.openable`) and the gallery's own files, so that a
    result is opened or downloaded as it is."""
    return [str(service.thumbnail_dir.resolve()), str(service.gallery.root.resolve())]


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
    # with --gallery, photos of that gallery to try (lens's own examples show whatever the gallery is)
    examples = [str(p) for p in service.example_photos()] if args.gallery else None
    demo = build_app(service, examples)
    demo.launch(
        server_name=args.host, server_port=args.port, css=CSS, theme=gr.themes.Soft(),
        allowed_paths=served_folders(service),
        max_file_size=MAX_BYTES,
    )


if __name__ == "__main__":
    main()
