"""Bulk embedding of image files: the same vectors whichever way the batches are scheduled."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import write_gallery

from lens.embedding import embed_files
from lens.images import load_image
from lens.methods.deep import HFBackbone


@pytest.fixture()
def three_thread_backbone(tiny_resnet) -> HFBackbone:
    """The tiny ResNet in ONNX Runtime as loaded on a 3-core machine: a 3-thread session, 3 streams."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        return HFBackbone("resnet50", str(tiny_resnet), "pooler", runtime="onnx")
    finally:
        torch.set_num_threads(threads)


def test_streams_embed_every_file_in_order_side_by_side(three_thread_backbone, tmp_path, monkeypatch):
    method = three_thread_backbone
    assert method.streams == 3
    paths = write_gallery(tmp_path, 11)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths.insert(4, broken)

    # the first two batches must be in the model at the same time, or this barrier breaks
    together = threading.Barrier(2, timeout=20)
    calls = {"stream": 0}
    stream = method.embed_stream

    def meeting(items):
        calls["stream"] += 1
        if calls["stream"] <= 2:
            together.wait()
        return stream(items)

    released = []
    monkeypatch.setattr(method, "embed_stream", meeting)
    monkeypatch.setattr(method, "embed_prepared", lambda items: pytest.fail("bulk work ran unstreamed"))
    monkeypatch.setattr(method, "release_streams", lambda: released.append(calls["stream"]))
    embedded = embed_files(method, paths, batch_size=2, progress=False)
    monkeypatch.undo()

    assert calls["stream"] == 6  # 12 files in batches of 2
    assert released == [6]  # the streams' sessions are let go once, after the last batch
    assert embedded.paths == [p for p in paths if p != broken]
    assert [p for p, _ in embedded.skipped] == [broken]
    one_by_one = np.concatenate([method.embed([load_image(p)]) for p in embedded.paths])
    np.testing.assert_allclose(embedded.vectors, one_by_one, atol=1e-5)


def test_one_thread_streams_match_the_query_runtime(three_thread_backbone, tiny_resnet, tmp_path):
    method = three_thread_backbone
    items = [method.prepare(load_image(p)) for p in write_gallery(tmp_path, 5)]
    np.testing.assert_allclose(method.embed_stream(items), method.embed_prepared(items), atol=1e-5)
    method.release_streams()  # the one-thread session goes; the next bulk call makes a new one
    np.testing.assert_allclose(method.embed_stream(items), method.embed_prepared(items), atol=1e-5)
    eager = HFBackbone("resnet50", str(tiny_resnet), "pooler", runtime="torch")
    assert eager.streams == 1  # PyTorch embeds one batch at a time, decoding on worker threads
    np.testing.assert_allclose(eager.embed_stream(items), method.embed_stream(items), atol=1e-5)


def test_streams_free_their_sessions_after_a_failed_batch_too(three_thread_backbone, tmp_path, monkeypatch):
    method = three_thread_backbone
    released = []

    def power_cut(items):
        raise RuntimeError("power cut")

    monkeypatch.setattr(method, "embed_stream", power_cut)
    monkeypatch.setattr(method, "release_streams", lambda: released.append(True))
    with pytest.raises(RuntimeError, match="power cut"):
        embed_files(method, write_gallery(tmp_path, 6), batch_size=2, progress=False)
    assert released == [True]
