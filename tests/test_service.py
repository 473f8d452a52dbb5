"""The app's service: start-up builds and what it serves, through LensService's public methods."""

from __future__ import annotations

import threading

import pytest

from conftest import write_gallery

from lens import Gallery, LensError
from lens.methods import register_method
from lens.methods.hashing import PerceptualHash
from lens.service import LensService

_release = threading.Event()
_loading = threading.Event()


@register_method("test-slow-download")
def _slow_download(spec: str, model: str | None = None) -> PerceptualHash:
    """A method whose model 'downloads' until the test releases it (like a hub fetch offline)."""
    _loading.set()
    if not _release.wait(60):
        raise RuntimeError("never released")
    return PerceptualHash("phash")


def test_a_method_that_needs_no_download_serves_while_another_model_still_loads(tmp_path):
    folder = tmp_path / "photos"
    write_gallery(folder, 6)
    gallery = Gallery(folder, tmp_path / "idx")
    service = LensService(gallery, ["test-slow-download", "phash"], )
    service.start()
    try:
        assert _loading.wait(30)
        for _ in range(300):  # phash must become ready while the other model is still loading
            if "phash" in service.ready_methods():
                break
            _release.wait(0.1)
        assert service.ready_methods() == ["phash"]
        states = {state.name: state.status for state in service.states()}
        assert states["test-slow-download"] == "queued"
    finally:
        _release.set()
        service.wait(60)
    assert sorted(service.ready_methods()) == ["phash", "test-slow-download"]


def test_a_mistyped_method_is_unknown_not_unindexed(tmp_path):
    folder = tmp_path / "photos"
    write_gallery(folder, 3)
    gallery = Gallery(folder, tmp_path / "idx")
    with pytest.raises(LensError) as raised:
        gallery.search(folder / "img000.jpg", "efficientnet")
    message = str(raised.value)
    assert "unknown method 'efficientnet'" in message and "phash" in message
    assert "lens index" not in message


def test_an_index_build_reports_each_batch_with_a_rate_and_the_time_left(tmp_path, monkeypatch):
    from lens.service import progress_text

    assert progress_text(0, 3068, 5.0) == "indexing 0/3068 (0%)"
    assert progress_text(320, 3068, 40.0) == "indexing 320/3068 (10%) · 8.0 img/s · about 6 min left"
    assert progress_text(90, 100, 9.0) == "indexing 90/100 (90%) · 10.0 img/s · about 1 s left"
    assert progress_text(100, 100, 10.0) == "indexing 100/100 (100%) · 10.0 img/s"

    folder = tmp_path / "photos"
    write_gallery(folder, 20)
    service = LensService(Gallery(folder, tmp_path / "idx"), ["phash"])
    seen: list[str] = []
    original = LensService._set
    monkeypatch.setattr(LensService, "_set", lambda self, m, status, detail="": (
        seen.append(detail), original(self, m, status, detail))[1])
    service.start(background=False)
    batches = [d for d in seen if d.startswith("indexing ")]
    assert batches and batches[-1].startswith("indexing 20/20 (100%) · "), seen
    assert service.states()[0].status == "ready"


def test_a_click_picks_the_smallest_box_under_it_or_a_region_around_it():
    from lens.detect import Box

    boxes = [Box(0, 0, 100, 100, "table", 0.9), Box(10, 10, 30, 30, "cup", 0.8)]
    assert LensService.subject_at(boxes, 20, 20, (200, 100)) == (1, boxes[1])
    hit, region = LensService.subject_at(boxes, 150, 50, (200, 100))
    assert hit is None and region.contains(150, 50) and region.label == "region around (150, 50)"
    assert not any(region.xyxy == b.xyxy for b in boxes)
    drawn = LensService.region((190, 90, 120, 40), (200, 100))
    assert drawn.xyxy == (120, 40, 190, 90) and drawn.label == "your region"


def test_examples_are_a_few_photos_spread_over_the_gallery(tmp_path):
    folder = tmp_path / "photos"
    write_gallery(folder, 20)
    service = LensService(Gallery(folder, tmp_path / "idx"), ["phash"])
    examples = service.example_photos(6)
    assert len(examples) == 6 == len(set(examples)) and all(p.is_file() and folder in p.parents for p in examples)
    assert examples != sorted(folder.iterdir())[:6]  # spread, not the first six
    assert service.example_photos(6, look_at=3) == sorted(folder.iterdir())[:3]


def test_k_is_a_whole_number_from_one_to_the_gallery_size(tmp_path):
    folder = tmp_path / "photos"
    write_gallery(folder, 5)
    service = LensService(Gallery(folder, tmp_path / "idx"), ["phash"])
    service.start(background=False)
    assert service.check_k(3) == 3 and service.check_k("4") == 4 and service.check_k(8.0) == 5
    for bad in (0, 0.1, -3, "x", None, float("nan")):
        with pytest.raises(LensError, match="from 1 to 5"):
            service.check_k(bad)
