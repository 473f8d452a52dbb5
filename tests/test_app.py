"""The app's API through gradio_client against a real Gradio server on localhost."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from bad_inputs import bad_input_corpus
from conftest import REPO, write_gallery
from PIL import Image

from lens import Gallery
from lens.detect import Box, register_detector
from lens.service import LensService

EXAMPLE = REPO / "examples" / "cat.jpg"


class QuadrantDetector:
    """A stand-in detector with known output: the left half and a small box in the right half."""

    def detect(self, image: Image.Image) -> list[Box]:
        width, height = image.size
        return [Box(0, 0, width / 2, height, "left", 0.9),
                Box(width * 0.6, height * 0.2, width * 0.9, height * 0.5, "small", 0.6)]


@register_detector("test-quadrants")
def _quadrants(weights=None, **options):
    return QuadrantDetector()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_resnet, tiny_dinov2):
    import app
    from gradio_client import Client

    root = tmp_path_factory.mktemp("app")
    write_gallery(root / "photos", 10)
    Image.open(EXAMPLE).save(root / "photos" / "cat.jpg")
    gallery = Gallery(root / "photos", root / "indexes", models={"resnet50": str(tiny_resnet),
                                                                  "vit": str(tiny_dinov2)})
    gallery.index(["resnet50"], progress=False)  # vit's index is missing: the app builds it at start
    service = LensService(gallery, ["resnet50", "vit"], detector="test-quadrants")
    service.start(background=True)
    demo = app.build_app(service)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(service.thumbnail_dir.resolve())])
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    deadline = time.time() + 120
    while {m["status"] for m in client.predict(api_name="/methods")} != {"ready"}:
        assert time.time() < deadline, client.predict(api_name="/methods")
        time.sleep(0.5)
    yield client, service
    demo.close()


def test_upload_pick_a_box_and_search_with_two_methods(served):
    from gradio_client import handle_file

    client, _ = served
    detected = client.predict(handle_file(str(EXAMPLE)), "", 0.25, api_name="/detect")
    width, height = detected["size"]
    assert [b["label"] for b in detected["boxes"]] == ["left", "small"]
    # a click at 75% width, 35% height is inside the small box only
    picked = client.predict(detected["boxes"], width * 0.75, height * 0.35, api_name="/pick")
    assert picked == 1
    assert client.predict(detected["boxes"], width * 0.75, height * 0.9, api_name="/pick") is None
    box = detected["boxes"][picked]["box"]
    for method in ("resnet50", "vit"):
        answer = client.predict(handle_file(str(EXAMPLE)), method, 4, box, api_name="/search")
        assert answer["method"] == method and answer["error"] is None
        assert [r["rank"] for r in answer["results"]] == [1, 2, 3, 4]
        assert all(0.0 <= r["score"] <= 1.0 for r in answer["results"])
        whole = client.predict(handle_file(str(EXAMPLE)), method, 1, None, api_name="/search")
        assert whole["results"][0]["image"] == "cat.jpg"  # the photo itself is in the gallery
        assert whole["results"][0]["score"] > 0.9


def test_one_search_decodes_the_photo_once_and_crops_it_once(served, monkeypatch):
    """Through the public path (the /search endpoint, as the app's search does): one decode, one crop."""
    from gradio_client import handle_file

    import lens.images

    client, _ = served
    decodes, crops = [], []
    decode, widen = lens.images._open, lens.images.expand_box
    monkeypatch.setattr(lens.images, "_open", lambda *a, **kw: decodes.append(a[0]) or decode(*a, **kw))
    monkeypatch.setattr(lens.images, "expand_box", lambda *a, **kw: crops.append(a[0]) or widen(*a, **kw))
    answer = client.predict(handle_file(str(EXAMPLE)), "resnet50", 3, [10, 10, 200, 150], api_name="/search")
    assert len(answer["results"]) == 3
    assert len(decodes) == 1 and len(crops) == 1, (decodes, crops)
    decodes.clear(), crops.clear()
    rows = client.predict(handle_file(str(EXAMPLE)), 2, [10, 10, 200, 150], api_name="/compare")
    assert len(rows) == 2 and len(decodes) == 1 and len(crops) == 1, (decodes, crops)


def test_the_pages_upload_then_search_decodes_once_and_crops_once(served, monkeypatch):
    """The page's own events: the upload is decoded once, the chosen box cropped once (shown and searched)."""
    import app
    import lens.images

    _, service = served
    decodes, crops = [], []
    decode, widen = lens.images._open, lens.images.expand_box
    monkeypatch.setattr(lens.images, "_open", lambda *a, **kw: decodes.append(Path(a[0])) or decode(*a, **kw))
    monkeypatch.setattr(lens.images, "expand_box", lambda *a, **kw: crops.append(a[0]) or widen(*a, **kw))
    on = app.Handlers(service)
    image, boxes, region, subject, _, _, _ = on.on_photo(str(EXAMPLE), "test-quadrants", 0.25)
    view, shown, exact, results, note, *_ = on.on_search(image, boxes, region, subject, "resnet50", 3)
    assert len(results) == 3 and "resnet50" in note
    assert decodes.count(EXAMPLE) == 1 and len(crops) == 1, (decodes, crops)
    assert shown.size != image.size  # the main subject was cropped, and that crop is what was searched


def test_compare_returns_one_row_per_indexed_method(served):
    from gradio_client import handle_file

    client, _ = served
    rows = client.predict(handle_file(str(EXAMPLE)), 3, None, api_name="/compare")
    assert [row["method"] for row in rows] == ["resnet50", "vit"]
    assert all(len(row["results"]) == 3 and row["seconds"] > 0 for row in rows)


def test_missing_index_was_built_at_start_up(served):
    client, service = served
    states = {m["name"]: m for m in client.predict(api_name="/methods")}
    assert states["vit"]["status"] == "ready"
    assert (service.gallery.index_dir / "vit" / "CURRENT").is_file()


def test_errors_are_readable_and_the_app_keeps_serving(served, tmp_path):
    from gradio_client import handle_file

    client, _ = served
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(Exception, match="not an image lens can read|cannot decode"):
        client.predict(handle_file(str(broken)), "resnet50", 3, None, api_name="/search")
    with pytest.raises(Exception, match="not served here"):
        client.predict(handle_file(str(EXAMPLE)), "sift-nope", 3, None, api_name="/search")
    answer = client.predict(handle_file(str(EXAMPLE)), "resnet50", 2, None, api_name="/search")
    assert len(answer["results"]) == 2


def test_thumbnails_never_leave_the_gallery(served, tmp_path):
    """Only paths inside the gallery folder's own tree are shown; a link the user put in the gallery
    is part of it (the scanner follows it, issue #17), a path climbing out with '..' never is."""
    from lens.errors import LensError
    from lens.gallery import SearchResult

    _, service = served
    outside = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8)).save(outside)
    link = service.gallery.root / "link.jpg"
    link.symlink_to(outside)
    try:
        for path in ("../../secret.jpg", "nested/../../secret.jpg", str(outside)):
            with pytest.raises(LensError, match="outside the gallery"):
                service.thumbnail(SearchResult(1, path, 1.0, Path(path)))
        assert service.thumbnail(SearchResult(1, "link.jpg", 1.0, link)).is_file()
        # opening a result: Gradio serves a file only when its target lies in a served folder, so a
        # linked file pointing elsewhere is handed over as a copy (results of a gallery of links
        # never opened); a file of the gallery's own is handed over as it is
        import app
        from gradio.utils import is_allowed_file

        def served(path: Path) -> bool:
            return is_allowed_file(path, [], app.served_folders(service), [])[0]

        linked = SearchResult(1, "link.jpg", 1.0, link)
        assert not served(service.original(linked))
        opened = service.openable(linked)
        assert served(opened) and opened.name == "link.jpg" and opened.read_bytes() == outside.read_bytes()
        assert service.openable(linked) == opened  # made once
        own = SearchResult(1, "cat.jpg", 1.0, service.gallery.root / "cat.jpg")
        assert service.openable(own) == service.gallery.root / "cat.jpg" and served(service.openable(own))
        with pytest.raises(LensError, match="no longer in the gallery.*lens index"):
            service.thumbnail(SearchResult(1, "gone.jpg", 1.0, service.gallery.root / "gone.jpg"))
    finally:
        link.unlink()


def test_every_bad_input_upload_gets_results_or_a_readable_error(served, tmp_path):
    from gradio_client import handle_file

    client, _ = served
    expect = bad_input_corpus(tmp_path)
    for name, ok in expect.items():
        upload = handle_file(str(tmp_path / name))
        if ok:
            detected = client.predict(upload, "", 0.25, api_name="/detect")
            assert len(detected["boxes"]) == 2, name
            answer = client.predict(upload, "resnet50", 3, detected["boxes"][0], api_name="/search")
            assert answer["error"] is None and len(answer["results"]) == 3, name
        else:
            for call in (lambda: client.predict(upload, "", 0.25, api_name="/detect"),
                         lambda: client.predict(upload, "resnet50", 3, None, api_name="/search")):
                with pytest.raises(Exception) as caught:
                    call()
                message = str(caught.value)
                # the user's file name, never the server's temporary folder
                assert f"'{name}'" in message and "/tmp" not in message and "Traceback" not in message, message
    rotated = client.predict(handle_file(str(tmp_path / "rotated.jpg")), "", 0.25, api_name="/detect")
    assert rotated["size"] == [48, 64]  # EXIF orientation applied
    answer = client.predict(handle_file(str(EXAMPLE)), "vit", 2, None, api_name="/search")
    assert len(answer["results"]) == 2  # and the app still serves


def test_the_upload_widget_hands_files_to_lens_unopened(tmp_path):
    """The photo input must not decode uploads itself: lens does, and explains what is wrong."""
    import app
    from gradio.data_classes import ImageData

    expect = bad_input_corpus(tmp_path)
    widget = app.photo_input(type="pil")
    for name in expect:
        assert widget.preprocess(ImageData(path=str(tmp_path / name), orig_name=name)) == str(tmp_path / name)
    assert widget.preprocess(None) is None


@pytest.fixture(scope="module")
def served_words(tmp_path_factory, shapes_clip):
    """The app serving a gallery of coloured shapes with a CLIP trained on them (tests/tiny_clip.py)."""
    import app
    from gradio_client import Client
    from tiny_clip import write_shapes

    root = tmp_path_factory.mktemp("app-words")
    kinds = write_shapes(root / "photos")
    gallery = Gallery(root / "photos", root / "indexes", models={"clip": str(shapes_clip)})
    service = LensService(gallery, ["clip"], detector="test-quadrants")
    service.start(background=False)  # builds the clip index
    demo = app.build_app(service)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(service.thumbnail_dir.resolve())])
    yield Client(f"http://127.0.0.1:{port}/", verbose=False), service, kinds
    demo.close()


def test_search_by_words_alone_and_by_a_photo_plus_words(served_words):
    from gradio_client import handle_file

    client, service, kinds = served_words
    words = client.predict(None, "clip", 6, None, "red", 0.5, api_name="/search")
    assert words["error"] is None and [kinds[r["image"]][0] for r in words["results"]] == ["red"] * 6
    assert {r["score_kind"] for r in words["results"]} == {"text cosine"}
    photo = handle_file(str(service.gallery.root / "blue-circle-0.png"))
    alone = client.predict(photo, "clip", 6, None, api_name="/search")
    assert alone["results"][0]["image"] == "blue-circle-0.png" and alone["results"][0]["score_kind"] == "cosine"
    refined = client.predict(photo, "clip", 6, None, "red", 0.6, api_name="/search")
    assert kinds[refined["results"][0]["image"]][0] == "red"
    assert refined["results"][0]["score_kind"] == "image+text cosine"
    with pytest.raises(Exception, match="nothing to search for"):
        client.predict(None, "clip", 6, None, "", 0.5, api_name="/search")


def test_the_pages_text_box_searches_with_or_without_a_photo(served_words):
    """The page's search event with the words box filled: no upload (words alone), then a photo + words."""
    import app

    _, service, kinds = served_words
    on = app.Handlers(service)
    view, crop, exact, results, note, *_ = on.on_search(None, [], None, app.WHOLE, "clip", 4, "  red ", 0.5)
    assert view is None and crop is None and exact == [] and len(results) == 4
    assert all(kinds[caption.split(" · ")[-1]][0] == "red" for _, caption in results)
    assert "“red”" in note and "far lower scale" in note  # the score's meaning is shown
    photo = app.load_image(service.gallery.root / "blue-circle-0.png")
    view, crop, exact, results, note, *_ = on.on_search(photo, [], None, app.WHOLE, "clip", 4, "red", 0.6)
    assert kinds[results[0][1].split(" · ")[-1]][0] == "red" and "+ “red”" in note and "image + words" in note
    _, _, exact, results, note, *_ = on.on_search(None, [], None, app.WHOLE, "clip", 4, "", 0.5)
    assert exact == results == [] and "type words" in note


def test_words_without_a_method_that_reads_them_keep_the_photos_results(served):
    """Words typed while no indexed method reads text: the photo's results stay, the note says why."""
    import app

    _, service = served
    on = app.Handlers(service)
    photo = app.load_image(next(p for p in sorted(service.gallery.root.rglob("*")) if p.is_file()))
    view, crop, exact, results, note, *_ = on.on_search(photo, [], None, app.WHOLE, "resnet50", 3, "in red", 0.5)
    assert view is not None and len(results) == 3 and "words were left out" in note
    _, _, exact, results, note, *_ = on.on_search(None, [], None, app.WHOLE, "resnet50", 3, "red", 0.5)
    assert exact == results == [] and "Words alone cannot be searched here" in note


def test_status_says_a_failure_in_one_line_with_details_folded_and_names_are_short(tmp_path):
    import app
    from lens.methods import register_method, short_name

    @register_method("test-broken-weights")
    def _broken(spec, model=None):
        raise RuntimeError("cannot load the weights\n  File x.py, line 1\n  File y.py, line 2\nOSError: gone")

    write_gallery(tmp_path / "photos", 3)
    service = LensService(Gallery(tmp_path / "photos", tmp_path / "idx"), ["test-broken-weights", "phash"])
    service.start(background=False)
    panel = app.status_markdown(service)
    lines = panel.splitlines()
    broken = next(line for line in lines if "test-broken-weights" in line)
    assert "failed (cannot load the weights)" in broken and broken.index("<details>") > broken.index("failed")
    # one HTML list, one item per method, no blank line (which ends an HTML block in Markdown): the
    # method after a failure's details once showed as raw text
    assert panel.startswith("<ul") and "\n\n" not in panel and panel.count("<li>") == len(service.states())
    assert any(line == "<li>● <b>phash</b>: ready (3 images)</li>" for line in lines), lines
    assert [short_name(s) for s in ("vit", "hf:facebook/dinov2-small", "hf:../w/efficientnet_lite0.in1k/")] == [
        "vit", "dinov2-small", "efficientnet_lite0.in1k"]
    assert app._method_choices(["auto", "hf:../w/efficientnet_lite0.in1k"]) == [
        ("auto", "auto"), ("efficientnet_lite0.in1k", "hf:../w/efficientnet_lite0.in1k")]


def test_a_click_outside_every_box_and_a_drawn_or_adjusted_region_are_searched(served):
    """The page's photo events: outside every box, a region around the click; in the box editor, the
    box drawn, moved or resized at each release (and nothing for a release that changed no box)."""
    import app
    import gradio as gr

    _, service = served
    on = app.Handlers(service)
    image, boxes, region, subject, menu, _, hint = on.on_photo(str(EXAMPLE), "test-quadrants", 0.25)
    assert menu["value"] == subject and subject in menu["choices"]
    width, height = image.size

    class Click:  # what gr.SelectData carries for a click on the photo
        def __init__(self, x, y):
            self.index = (x, y)

    # a k to correct is said in a toast, and the page keeps what it shows (it showed "Error" on every
    # output until the next search)
    with pytest.warns(UserWarning, match="whole number from 1"):
        kept = on.on_search(image, boxes, region, subject, "resnet50", None)
    assert kept == tuple(gr.skip() for _ in range(8))
    region, subject, menu, hint, view, crop, _, results, note, found, corners, _ = on.on_click_search(
        image, boxes, region, "resnet50", 3, "", 0.5, Click(width * 0.75, height * 0.9))  # no box there
    assert menu["value"] == subject and subject.startswith(app.REGION + "region around") and "No detected object" in hint
    assert len(results) == 3 and "results for *region around" in note and crop.size < image.size
    assert [f["rank"] for f in found] == [1, 2, 3]

    # Draw or adjust: the editor gets the photo, the detected boxes and the region, in whole pixels
    shown, editor, edited, hint = on.on_tool(app.ADJUST, image, boxes, region)
    assert shown["visible"] is False and editor["visible"] and editor["value"]["image"] is image
    assert len(edited) == len(boxes) + 1 and edited[-1] == tuple(round(v) for v in region.xyxy)
    assert [b["label"] for b in editor["value"]["boxes"][:2]] == [f"1 {boxes[0].label}", f"2 {boxes[1].label}"]
    assert "drag" in hint
    boxes_now = editor["value"]["boxes"]
    # a release that changed nothing searches nothing
    *_, again = on.on_adjust(image, boxes, edited, {"boxes": boxes_now})
    assert again is False and on.after_adjust(again, image, boxes, region, subject, "resnet50", 2)[0] is not None
    # a box dragged from (60, 20) up and left to (10, 2), put first by the editor: searched, ordered
    drawn = [{"xmin": 60, "ymin": 20, "xmax": 10, "ymax": 2, "label": ""}, *boxes_now]
    region, edited, subject, menu, hint, again = on.on_adjust(image, boxes, edited, {"boxes": drawn})
    assert menu["value"] == subject == app.REGION + "your region: 10, 2, 60, 20"
    assert again is True and region.xyxy == (10, 2, 60, 20) and region.label == "your region"
    assert edited == app._xyxy(drawn) and "is searched" in hint
    *_, note, found, corners, opened = on.after_adjust(again, image, boxes, region, subject, "resnet50", 2)
    assert "*your region* (10, 2, 60, 20)" in note and corners == "10, 2, 60, 20" and len(found) == 2
    shown, picture, download, caption = on.on_open(found, 1)
    assert shown["visible"] and Path(picture["value"]).is_file() and "#2" in caption
    # the first detected box resized by its bottom-right handle: that box is searched
    x1, y1, x2, y2 = edited[1]
    resized = [drawn[0], {**drawn[1], "xmax": x2 + 10, "ymax": y2 - 5}, *drawn[2:]]
    region, edited, subject, menu, hint, again = on.on_adjust(image, boxes, edited, {"boxes": resized})
    assert again is True and region.xyxy == (x1, y1, x2 + 10, y2 - 5)
    # a box drawn in the margin beside the photo: said so, nothing searched
    beside = [{"xmin": -60, "ymin": 5, "xmax": -20, "ymax": 40}, *resized]
    _, edited, _, _, hint, again = on.on_adjust(image, boxes, edited, {"boxes": beside})
    assert again is False and edited == app._xyxy(beside) and "outside" in hint
    shown, editor, edited, hint = on.on_tool(app.PICK, image, boxes, region)
    assert shown["visible"] and editor["visible"] is False and edited == [] and hint == app.HINT
    region, *_ = on.on_region(image, boxes, "70, 80, 20, 30")
    assert region.xyxy == (20, 30, 70, 80)


def test_the_box_editor_reads_the_boxes_the_browser_sends_back(tmp_path):
    """The editor's boxes as the browser sends them back after the server set them (a JSON round
    trip), through the component's own parser: a colour sent as a tuple came back as a list, which
    the parser (it wants "rgb(r, g, b)") failed on with TypeError on every release after a switch to
    *Draw or adjust*; colours are sent as the editor writes them."""
    import json

    import app
    from gradio.data_classes import FileData
    from gradio_image_annotation.image_annotator import AnnotatedImageData

    from lens.types import Box

    Image.new("RGB", (80, 60)).save(tmp_path / "photo.png")
    shown = app._editor_boxes([Box(20, 10, 60, 50, 0.9, "cup")], Box(1, 2, 30, 40, 1.0, "your region"))
    echoed = json.loads(json.dumps(shown))  # what the browser sends back
    sent = AnnotatedImageData(image=FileData(path=str(tmp_path / "photo.png")), boxes=echoed)
    from gradio_image_annotation import image_annotator

    value = image_annotator(value=None).preprocess(sent)
    assert app._xyxy(value["boxes"]) == [(20, 10, 60, 50), (1, 2, 30, 40)]
    assert [b["color"] for b in value["boxes"]][1] == (255, 255, 255)


def test_searches_read_the_photo_and_its_subject_from_one_place(served):
    """Regression: a search started while a new photo was being handled (the method menu filled in
    at page load fires one) read the Subject menu's value the browser sent, still "Whole image", with
    the new photo kept on the server, and searched the whole photo instead of the detected cup (the
    browser test failed so under load). What a search reads of the photo (the photo, its boxes, the
    region, the Subject chosen) is server-side state, changed together in one event; from the browser
    only the method, k and the words."""
    import app
    import gradio as gr

    _, service = served
    demo = app.build_app(service)
    searches = [fn for fn in demo.fns.values()
                if getattr(fn.fn, "__name__", "") in ("on_search", "on_click_search", "after_adjust", "on_compare")]
    assert len(searches) >= 9  # the upload, detector settings, click, editor, corners, Subject, method, k, words...
    browser = {"lens-method", "lens-k", "lens-text", "lens-text-weight"}
    for fn in searches:
        sent = [block.elem_id for block in fn.inputs if not isinstance(block, gr.State)]
        assert set(sent) <= browser, (fn.fn.__name__, sent)
    # a click and its search are one event, run for the latest click only: quick clicks once ran
    # several searches at once, and an earlier one landing last left the Subject on one box and the
    # results of another
    clicks = [fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "on_click_search"]
    assert len(clicks) == 1 and clicks[0].trigger_mode == "always_last"


def test_the_note_says_exact_matches_are_of_the_photo_and_similar_ones_of_the_subject():
    import app
    from lens.service import Outcome
    from lens.types import SearchResult

    exact = SearchResult(1, "poster.jpg", 42, Path("poster.jpg"), kind="inliers", match="exact", inliers=42)
    similar = SearchResult(2, "man.jpg", 0.7, Path("man.jpg"))
    note = app._note(Outcome("auto", [exact, similar], 0.05), "*person*")
    assert "1 exact match in the photo (outlined), 1 similar to *person*" in note and note.startswith("**auto**")
    assert "2 results for *cup*" in app._note(Outcome("hf:../w/effnet", [similar, similar], 0.05), "*cup*")
    assert app._note(Outcome("hf:../w/effnet", [similar], 0.05), "*cup*").startswith("**effnet**")


def test_the_words_box_is_folded_unless_a_served_method_reads_words(served, served_words):
    """The photo comes first on the page; "Add words to your search" sits below it, open only when a
    served method reads words (the clip family), known from the specs without loading anything."""
    import app
    import gradio as gr
    from lens.methods import reads_words

    assert [reads_words(s) for s in ("clip", "siglip", "clip:openai/clip-vit-base-patch32")] == [True] * 3
    assert not any(reads_words(s) for s in ("phash", "hf:../w/clip-like", "vit", "local"))

    def words_fold(service) -> gr.Accordion:
        demo = app.build_app(service)
        return next(b for b in demo.blocks.values()
                    if isinstance(b, gr.Accordion) and b.label == "Add words to your search")

    assert words_fold(served[1]).open is False and words_fold(served_words[1]).open is True
