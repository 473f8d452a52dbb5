"""The clip / siglip methods: both towers equal transformers' own features, and search by words works.

No hub access: tiny CLIP and SigLIP folders (random, or trained here on coloured shapes; tests/tiny_clip.py)
load through the same ``from_pretrained`` path as hub ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from tiny_clip import COLOURS, shape_picture, write_shapes

from lens import Gallery
from lens.errors import LensError, ModelLoadError
from lens.methods import create_method
from lens.search import compose_query
from lens.types import SCORE_LABELS, EmbedsText

TEXTS = ["a red circle", "blue", "a photo of a cat dress", "square unknownword"]


def _reference(folder):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    return (AutoModel.from_pretrained(folder).eval(), AutoImageProcessor.from_pretrained(folder),
            AutoTokenizer.from_pretrained(folder))


def _unit(tensor: torch.Tensor) -> np.ndarray:
    return (tensor / tensor.norm(dim=-1, keepdim=True)).numpy()


@pytest.mark.parametrize("family", ["clip", "siglip", "clip:"])
def test_both_towers_equal_transformers_features(family, tiny_clip, tiny_siglip):
    """Image and text embeddings are transformers' get_image_features / get_text_features (values),
    computed in ONNX Runtime, for a CLIP and a SigLIP folder loaded as a hub id would be."""
    folder = tiny_siglip if family == "siglip" else tiny_clip
    method = (create_method(f"clip:{folder}") if family == "clip:" else create_method(family, model=str(folder)))
    assert isinstance(method, EmbedsText)
    assert (method.runtime, method.text_runtime) == ("onnxruntime", "onnxruntime")
    model, processor, tokenizer = _reference(folder)
    rng = np.random.default_rng(0)
    pictures = [shape_picture("red", "circle", rng), shape_picture("blue", "square", rng, size=90)]
    with torch.no_grad():
        pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
        images = _unit(model.get_image_features(pixel_values=pixels).pooler_output)
        # SigLIP is used padded to its full length (as transformers' zero-shot pipeline pads it)
        tokens = tokenizer(TEXTS, padding="max_length", max_length=8, return_tensors="pt")
        texts = _unit(model.get_text_features(**tokens).pooler_output)
    assert method.info.dim == images.shape[1]
    np.testing.assert_allclose(method.embed(pictures), images, atol=1e-5)
    np.testing.assert_allclose(method.embed_text(TEXTS), texts, atol=1e-5)
    if family != "siglip":  # CLIP pools its end-of-text token: padding to full length changes nothing
        with torch.no_grad():
            shortest = _unit(model.get_text_features(**tokenizer(TEXTS, padding=True, return_tensors="pt"))
                             .pooler_output)
        np.testing.assert_allclose(method.embed_text(TEXTS), shortest, atol=1e-5)


def test_a_model_without_a_text_tower_is_a_clear_error(tiny_resnet):
    with pytest.raises(ModelLoadError, match="not a CLIP-family model.*hf:"):
        create_method("clip", model=str(tiny_resnet))


def test_compose_query_is_the_weighted_sum_of_unit_vectors():
    image, text = np.array([[3.0, 0.0]], np.float32), np.array([[0.0, 0.5]], np.float32)
    np.testing.assert_allclose(compose_query(image, text, 0.0), [[1, 0]])
    np.testing.assert_allclose(compose_query(image, text, 1.0), [[0, 1]])
    np.testing.assert_allclose(compose_query(image, text, 0.5), [[2**-0.5, 2**-0.5]], rtol=1e-6)
    np.testing.assert_allclose(compose_query(None, text, 0.5), [[0, 1]])
    with pytest.raises(LensError, match="between 0"):
        compose_query(image, text, 1.5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, shapes_clip):
    """A gallery of every colour x shape (2 each), indexed with the trained shapes CLIP."""
    root = tmp_path_factory.mktemp("shapes")
    kinds = write_shapes(root / "photos")
    gallery = Gallery(root / "photos", root / "indexes", models={"clip": str(shapes_clip)})
    gallery.index(["clip"], progress=False)
    return gallery, kinds


def _colours(results, kinds) -> list[str]:
    return [kinds[r.path][0] for r in results]


def test_words_rank_the_gallery(shapes):
    gallery, kinds = shapes
    per_colour = len(kinds) // len(COLOURS)
    for colour in COLOURS:
        results = gallery.search(None, "clip", k=per_colour, text=colour)
        assert _colours(results, kinds) == [colour] * per_colour, [r.path for r in results]
        assert {r.kind for r in results} == {"text cosine"} and "text cosine" in SCORE_LABELS


def test_words_move_a_photo_query_toward_them(shapes):
    gallery, kinds = shapes
    photo = gallery.root / "blue-circle-0.png"
    alone = gallery.search(photo, "clip", k=8)
    refined = gallery.search(photo, "clip", k=8, text="red", text_weight=0.6)
    assert alone[0].path == "blue-circle-0.png" and alone[0].kind == "cosine"
    assert _colours(alone, kinds).count("red") < _colours(refined, kinds).count("red")
    assert _colours(refined, kinds)[0] == "red" and refined[0].kind == "image+text cosine"
    assert "blue" in _colours(refined, kinds)  # the photo still counts
    # the weight is the words' share: 0 is the photo alone, 1 the words alone
    assert [r.path for r in gallery.search(photo, "clip", k=8, text="red", text_weight=0.0)] == \
        [r.path for r in alone]
    words = gallery.search(None, "clip", k=8, text="red")
    assert [r.path for r in gallery.search(photo, "clip", k=8, text="red", text_weight=1.0)] == \
        [r.path for r in words]


def test_bad_text_queries_are_clear_errors(shapes, tiny_resnet):
    gallery, _ = shapes
    with pytest.raises(LensError, match="empty"):
        gallery.search(None, "clip", text="   ")
    for weight in (-0.1, 1.5):
        for photo in (gallery.root / "red-circle-0.png", None):
            with pytest.raises(LensError, match="between 0"):
                gallery.search(photo, "clip", text="red", text_weight=weight)
    with pytest.raises(LensError, match="give a photo, words"):
        gallery.search(None, "clip")
    other = Gallery(gallery.root, gallery.index_dir, models={"resnet50": str(tiny_resnet)})
    other.index(["resnet50"], progress=False)
    with pytest.raises(LensError, match="cannot read words.*clip"):
        other.search(None, "resnet50", text="red")


def test_cli_searches_by_words_and_by_photo_plus_words(shapes, shapes_clip, capsys):
    from lens.cli import main

    gallery, kinds = shapes
    common = ["--gallery", str(gallery.root), "--index-dir", str(gallery.index_dir), "--method", "clip",
              "--model", f"clip={shapes_clip}", "-k", "6", "--json"]
    # words alone, as a user runs it (a real process)
    done = subprocess.run([sys.executable, "-m", "lens", "search", "--text", "red", *common],
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    words = json.loads(done.stdout)
    assert [kinds[os.path.basename(r["path"])][0] for r in words] == ["red"] * 6
    assert {r["score_kind"] for r in words} == {"text cosine"}
    # a photo refined by words (in-process: the same command, without loading the model again)
    assert main(["search", str(gallery.root / "blue-circle-0.png"), "--text", "red", "--text-weight", "0.6",
                 *common]) == 0
    refined = json.loads(capsys.readouterr().out)
    assert kinds[os.path.basename(refined[0]["path"])][0] == "red"
    assert refined[0]["score_kind"] == "image+text cosine"
    assert main(["search", *common]) == 1
    assert "lens: error: give a QUERY photo, --text WORDS, or both" in capsys.readouterr().err
