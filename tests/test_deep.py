"""Deep methods load local folders through the same code path as hub ids and embed like the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_picture

from lens.errors import LensError, ModelLoadError
from lens.methods import create_method, list_methods, method_slug


def _reference(folder, images, pooling: str) -> np.ndarray:
    """What transformers itself gives: the model's own processor, forward, pooled output."""
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(**processor(images=images, return_tensors="pt"))
    pooled = out.pooler_output.flatten(1) if pooling == "pooler" else out.last_hidden_state[:, 0]
    pooled = pooled.numpy()
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


@pytest.mark.parametrize("fixture, spec, pooling", [
    ("tiny_resnet", "resnet50", "pooler"),
    ("tiny_dinov2", "vit", "pooler"),
    ("tiny_dinov2", "vit-in21k", "cls"),
])
def test_preset_with_local_folder_matches_transformers_reference(request, fixture, spec, pooling):
    folder = request.getfixturevalue(fixture)
    images = [make_picture(seed, size=(90 + 7 * seed, 70)) for seed in range(5)]
    method = create_method(spec, model=str(folder))
    vectors = method.embed(images)
    expected = _reference(folder, images, pooling)
    assert vectors.shape == expected.shape
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert method.info.dim == expected.shape[1]
    assert method.info.metric == "cosine"
    assert method.runtime == "onnxruntime"  # on CPU the forward pass runs in ONNX Runtime


def test_hf_prefix_loads_any_local_backbone(tiny_resnet):
    method = create_method(f"hf:{tiny_resnet}")
    assert method.info.model == str(tiny_resnet)
    assert method.info.extra["architecture"] == "ResNetModel"
    vectors = method.embed([make_picture(1), make_picture(2)])
    np.testing.assert_allclose(vectors, _reference(tiny_resnet, [make_picture(1), make_picture(2)], "pooler"),
                               atol=1e-5)


def test_method_is_loaded_once_per_process(tiny_resnet):
    assert create_method(f"hf:{tiny_resnet}") is create_method(f"hf:{tiny_resnet}")


def test_weights_fingerprint_tracks_values_not_paths(tiny_resnet, tiny_resnet_other, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_resnet, tmp_path / "copy")
    a, b = create_method(f"hf:{tiny_resnet}"), create_method(f"hf:{copy}")
    assert a.info.weights == b.info.weights
    assert create_method(f"hf:{tiny_resnet_other}").info.weights != a.info.weights


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"--model resnet50=PATH"):
        create_method("resnet50", model=str(tmp_path / "nowhere"))


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(LensError, match="resnet50"):
        create_method("no-such-method")
    assert {"resnet50", "vit", "vit-in21k", "hf:<id or path>"} <= set(list_methods())


def test_method_slugs_are_folder_names():
    assert method_slug("resnet50") == "resnet50"
    assert method_slug("hf:facebook/dinov2-base") == "hf-facebook--dinov2-base"
    assert method_slug("hf:../shared/weights/efficientnet_lite0.in1k") == "hf-efficientnet_lite0.in1k"


@pytest.mark.parametrize("fixture", ["tiny_resnet", "tiny_dinov2"])
def test_onnx_runtime_and_pytorch_give_the_same_embeddings(request, fixture, monkeypatch, tmp_path):
    from lens.methods.deep import HFBackbone
    from lens.methods.runtime import cache_dir

    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path))
    folder = str(request.getfixturevalue(fixture))
    images = [make_picture(seed) for seed in range(3)]
    fast, eager = HFBackbone("a", folder, runtime="onnx"), HFBackbone("b", folder, runtime="torch")
    assert (fast.runtime, eager.runtime) == ("onnxruntime", "torch")
    assert fast.info.weights == eager.info.weights  # indexes built with one are searched with the other
    np.testing.assert_allclose(fast.embed(images), eager.embed(images), atol=1e-5)
    [exported] = cache_dir().glob("*.onnx")
    # exported once: a second load reuses the file; a damaged file is exported again
    modified = exported.stat().st_mtime_ns
    HFBackbone("c", folder, runtime="onnx")
    assert exported.stat().st_mtime_ns == modified
    exported.write_bytes(b"garbage")
    again = HFBackbone("d", folder, runtime="onnx")
    np.testing.assert_allclose(again.embed(images), eager.embed(images), atol=1e-5)


def test_runtime_falls_back_to_pytorch_when_onnx_cannot_run(tiny_resnet, monkeypatch, caplog):
    import lens.methods.deep as deep

    def broken(*args, **kwargs):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(deep, "onnx_forward", broken)
    method = deep.HFBackbone("resnet50", str(tiny_resnet))  # auto
    assert method.runtime == "torch" and "no exporter here" in caplog.text
    with pytest.raises(ModelLoadError, match="ONNX Runtime: no exporter here"):
        deep.HFBackbone("resnet50", str(tiny_resnet), runtime="onnx")
    monkeypatch.setenv("LENS_RUNTIME", "tensorrt")
    with pytest.raises(ModelLoadError, match="LENS_RUNTIME must be one of"):
        deep.HFBackbone("resnet50", str(tiny_resnet))


def test_lens_runtime_setting_gives_its_own_loaded_method(tiny_resnet, monkeypatch):
    spec = f"hf:{tiny_resnet}"
    monkeypatch.setenv("LENS_RUNTIME", "torch")
    eager = create_method(spec)
    monkeypatch.setenv("LENS_RUNTIME", "onnx")
    fast = create_method(spec)
    assert (eager.runtime, fast.runtime) == ("torch", "onnxruntime")
    assert create_method(spec) is fast
