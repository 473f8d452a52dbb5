"""Exact-item search with local features ("local"): generated planar scenes with known ground truth.

Every scene is a textured picture pasted with a known perspective warp into clutter, so the item,
its exact-match mark and its outline in the result image are all known.
"""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from lens import Gallery
from lens.errors import LensError
from lens.methods.local import InvertedFile, LocalConfig, LocalMatcher, Vocabulary
from lens.search import search_pictures

SIZE = (320, 240)  #: items and scenes, pixels (width, height)
ITEMS = 10


def texture(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A distinct, richly textured RGB picture: blurred noise at several scales plus random shapes."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = np.zeros((height, width, 3), np.float32)
    for scale in (4, 12, 32):
        small = rng.random((height // scale + 2, width // scale + 2, 3)).astype(np.float32)
        image += cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC) * 80
    image = np.clip(image, 0, 255).astype(np.uint8)
    for _ in range(25):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), int(rng.integers(4, 25)), colour, -1)
        else:
            cv2.rectangle(image, (x, y), (x + int(rng.integers(5, 40)), y + int(rng.integers(5, 40))), colour, -1)
    return image


def warp_into(item: np.ndarray, background: np.ndarray, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``item`` pasted into ``background`` with its corners at ``corners`` (4, 2); returns (scene, H item->scene)."""
    height, width = item.shape[:2]
    source = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    homography = cv2.getPerspectiveTransform(source, corners.astype(np.float32))
    size = (background.shape[1], background.shape[0])
    warped = cv2.warpPerspective(item, homography, size)
    mask = cv2.warpPerspective(np.full((height, width), 255, np.uint8), homography, size)
    scene = np.where(mask[..., None] > 0, warped, background)
    return scene, homography


ITEM_CORNERS = np.array([[70, 40], [270, 60], [255, 215], [60, 200]], np.float32)  # in a 320x240 scene


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A gallery of ``ITEMS`` textures and one wall scene holding a smaller item; the queries."""
    root = tmp_path_factory.mktemp("local-gallery")
    for i in range(ITEMS):
        Image.fromarray(texture(i)).save(root / f"item{i}.png")
    small = texture(100, (160, 120))  # shown only inside the wall scene
    wall, wall_h = warp_into(small, texture(101), np.array([[150, 30], [300, 50], [290, 170], [140, 150]]))
    Image.fromarray(wall).save(root / "wall.png")
    photo, photo_h = warp_into(texture(3), texture(200), ITEM_CORNERS)  # item 3 in clutter
    return {"root": root, "photo": photo, "photo_h": photo_h, "small": small, "wall_h": wall_h,
            "unrelated": texture(300)}


@pytest.fixture(scope="module")
def gallery(scenes, tmp_path_factory):
    gallery = Gallery(scenes["root"], tmp_path_factory.mktemp("local-index"))
    gallery.index(["local"], progress=False)
    return gallery


def test_a_photo_of_an_item_in_clutter_finds_it_marked_exact(gallery, scenes):
    results = gallery.search(scenes["photo"], "local", k=5)
    assert results[0].path == "item3.png"
    assert results[0].match == "exact" and results[0].kind == "inliers" and results[0].inliers >= 20
    assert all(r.match != "exact" for r in results[1:])
    # the photo's outline in the item's pixels: the inverse of the known warp applied to the photo's corners
    expected = cv2.perspectiveTransform(
        np.array([[[0, 0]], [[SIZE[0], 0]], [[SIZE[0], SIZE[1]]], [[0, SIZE[1]]]], np.float32),
        np.linalg.inv(scenes["photo_h"])).reshape(4, 2)
    assert np.abs(np.array(results[0].region) - expected).max() < 6
    assert results[0].as_dict()["match"] == "exact" and len(results[0].as_dict()["region"]) == 4


def test_part_of_an_image_finds_the_image_holding_it_with_its_outline(gallery, scenes):
    """The query is an item that the gallery shows only inside a wall scene: the outline is where it is."""
    results = gallery.search(scenes["small"], "local", k=3)
    assert results[0].path == "wall.png" and results[0].match == "exact"
    height, width = scenes["small"].shape[:2]
    expected = cv2.perspectiveTransform(
        np.array([[[0, 0]], [[width, 0]], [[width, height]], [[0, height]]], np.float32), scenes["wall_h"]
    ).reshape(4, 2)
    assert np.abs(np.array(results[0].region) - expected).max() < 3


def test_an_unrelated_picture_is_never_marked_exact(gallery, scenes):
    for picture in (scenes["unrelated"], texture(301), texture(302, (200, 300))):
        assert all(r.match == "similar" and r.region is None for r in gallery.search(picture, "local", k=10))


def test_the_subject_box_focuses_without_cutting_keypoints_off(gallery, scenes):
    box = (60, 40, 200, 210)  # covers only part of the item: a crop to it would lose most matches
    results = gallery.search(scenes["photo"], "local", k=3, box=box)
    assert results[0].path == "item3.png" and results[0].match == "exact"


def test_a_saved_vocabulary_and_inverted_file_reload_to_identical_results(gallery, scenes, tmp_path):
    build = gallery.open("local").folder
    method = gallery.method("local")
    again = LocalMatcher("local", method.config).load_state(build)
    query = method.prepare(Image.fromarray(scenes["photo"]))
    assert np.array_equal(again.prepare(Image.fromarray(scenes["photo"])).words, query.words)
    first, second = method.match(query, 5), again.match(query, 5)
    assert [(m.row, m.inliers, m.votes) for m in first] == [(m.row, m.inliers, m.votes) for m in second]
    # a vocabulary saved on its own is reused by another gallery's index, unchanged
    saved = tmp_path / "vocabulary"
    method.vocabulary.save(saved)
    reused = LocalMatcher("local", LocalConfig(vocabulary=str(saved))).fit([])
    assert reused.vocabulary.fingerprint == method.vocabulary.fingerprint


def test_incremental_add_and_delete_keep_the_other_images(scenes, tmp_path):
    root = tmp_path / "gallery"
    shutil.copytree(scenes["root"], root)
    gallery = Gallery(root, tmp_path / "index")
    gallery.index(["local"], progress=False)
    Image.fromarray(texture(3)).save(root / "copy-of-3.png")
    (root / "item5.png").unlink()
    report = gallery.index(["local"], progress=False)[0]
    assert (report.embedded, report.reused, report.count) == (1, ITEMS, ITEMS + 1)
    found = [r.path for r in gallery.search(scenes["photo"], "local", k=3) if r.match == "exact"]
    assert sorted(found) == ["copy-of-3.png", "item3.png"]
    assert all(r.path != "item5.png" for r in gallery.search(texture(5), "local", k=10))


def test_local_builds_keep_no_vector_index_and_still_search(scenes, tmp_path):
    """``local`` retrieves with its inverted file: its builds hold no (1-d placeholder) vector index,
    even when an index backend is asked for, and searching it through the vector path is refused."""
    gallery = Gallery(scenes["root"], tmp_path / "index")
    [report] = gallery.index(["local"], index_spec="faiss:HNSW32", progress=False)
    stored = gallery.open("local")
    assert stored.index is None and stored.manifest["index"] is None
    assert not {"index.ann", "index.faiss"} & set(stored.manifest["files"])
    assert not list(report.folder.glob("index.*"))
    assert gallery.indexed_methods() == ["local"]
    assert gallery.search(scenes["photo"], "local", k=1)[0].path == "item3.png"
    with pytest.raises(LensError, match="no vector index"):
        search_pictures(stored, gallery.method("local"), [Image.fromarray(scenes["photo"])], gallery.root)
    [again] = gallery.index(["local"], progress=False)  # a refresh reuses every row, still no index
    assert (again.embedded, again.reused) == (0, ITEMS + 1) and gallery.open("local").index is None


def test_inverted_file_add_and_delete_match_a_fresh_build():
    rng = np.random.default_rng(0)
    vocabulary = Vocabulary.learn(rng.random((4000, 128)).astype(np.float32), 64)
    features = [vocabulary.quantise(rng.random((50, 2)).astype(np.float32) * 100,
                                    rng.integers(0, 255, (50, 128)).astype(np.uint8), (100, 100))
                for _ in range(6)]
    grown = InvertedFile.build(vocabulary.words, features[:4])
    assert list(grown.add(features[4:])) == [4, 5]
    fresh = InvertedFile.build(vocabulary.words, features)
    for name in ("post_rows", "post_keys", "post_signatures", "starts", "idf"):
        assert np.array_equal(getattr(grown, name), getattr(fresh, name)), name
    grown.delete([1])
    scores, _ = grown.vote(features[1], 24, 16.0)
    assert scores[1] == 0 and scores[[0, 2, 3, 4, 5]].max() >= 0
    assert scores.argmax() != 1


def test_the_combined_search_puts_exact_matches_above_visually_similar(gallery, scenes):
    gallery.index(["phash"], progress=False)  # the "visually similar" part (any other index serves)
    results = gallery.search(scenes["photo"], "auto", k=5)
    assert [r.rank for r in results] == [1, 2, 3, 4, 5]
    assert results[0].path == "item3.png" and results[0].match == "exact" and results[0].region
    assert [r.match for r in results[1:]] == ["similar"] * 4
    assert len({r.path for r in results}) == 5  # the exact match is not repeated among the similar
    assert all(r.match == "similar" for r in gallery.search(scenes["unrelated"], "auto", k=5))
