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
