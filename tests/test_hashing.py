"""Perceptual hashes: 64-bit codes, Hamming search in Annoy / FAISS, near-duplicates they survive."""

from __future__ import annotations

import imagehash
import numpy as np
import pytest
from near_duplicates import PHOTOS, VARIANTS, photo, shared_path

from lens import Gallery, create_method
from lens.cli import main
from lens.errors import LensError

HASHES = ["phash", "dhash", "ahash"]
#: the edits every hash is documented to survive (docs/methods.md); flips, 90-degree rotations and
#: large crops change the code too much
SURVIVED_BY_HASHES = ["resize", "jpeg", "brighter", "crop90"]


@pytest.fixture(scope="module")
def gallery(photos, tmp_path_factory) -> Gallery:
    gallery = Gallery(photos, tmp_path_factory.mktemp("indexes"))
    gallery.index(HASHES, progress=False)
    return gallery


@pytest.mark.parametrize("name", HASHES)
def test_codes_are_64_packed_bits_equal_to_imagehash(name):
    method = create_method(name)
    assert (method.info.metric, method.info.dim) == ("hamming", 64)
    image = photo("chelsea")
    codes = method.embed([image, image.transpose(0)])
    assert codes.dtype == np.uint8 and codes.shape == (2, 8)
    function = {"phash": imagehash.phash, "dhash": imagehash.dhash, "ahash": imagehash.average_hash}[name]
    assert np.array_equal(np.unpackbits(codes[0]), function(image).hash.reshape(-1).astype(np.uint8))
    assert not np.array_equal(codes[0], codes[1])


@pytest.mark.parametrize("name", HASHES)
@pytest.mark.parametrize("variant", SURVIVED_BY_HASHES)
def test_hash_finds_the_original_of_a_near_duplicate(gallery, name, variant):
    queries = [VARIANTS[variant](photo(p)) for p in PHOTOS]
    for original, results in zip(PHOTOS, gallery.search_many(queries, name, k=3)):
        assert results[0].path == f"{original}.png", (name, variant, original)
        assert results[0].kind == "hamming" and 0.0 <= results[0].score <= 1.0


def test_scores_are_one_minus_hamming_over_bits_and_exact_brute_force_agrees(gallery):
    query = VARIANTS["jpeg"](photo("coffee"))
    code = create_method("phash").embed([query])[0]
    stored = gallery.open("phash")
    distances = np.unpackbits(np.bitwise_xor(np.asarray(stored.vectors), code), axis=1).sum(axis=1)
    expected = sorted(1 - distances / 64)[::-1][:5]
    annoy = gallery.search(query, "phash", k=5)
    brute = gallery.search(query, "phash", k=5, rerank="all")
    assert [r.score for r in brute] == pytest.approx(expected)
    assert [r.score for r in annoy] == pytest.approx(expected)  # tiny gallery: Annoy is exact here
    assert brute[0].path == annoy[0].path == "coffee.png"


def test_faiss_binary_index_round_trips_and_matches_annoy(photos, tmp_path, gallery):
    other = Gallery(photos, tmp_path / "idx")
    other.index(["phash"], index_spec="faiss:BFlat", progress=False)
    assert other.manifest("phash")["index"] == "faiss:BFlat"
    fresh = Gallery(photos, tmp_path / "idx")  # opens the index files from disk
    query = VARIANTS["resize"](photo("rocket"))
    assert [(r.path, r.score) for r in fresh.search(query, "phash", k=4)] == [
        (r.path, r.score) for r in gallery.search(query, "phash", k=4, rerank="all")
    ]


def test_hash_method_refuses_model_weights_and_lsh(photos, tmp_path):
    with pytest.raises(LensError, match="no model weights"):
        create_method("phash", model="some/model")
    with pytest.raises(LensError, match="lsh backend hashes float vectors"):
        Gallery(photos, tmp_path / "idx").index(["phash"], index_spec="lsh:64", progress=False)


def test_cli_labels_hamming_scores(photos, tmp_path, capsys):
    """`lens index` + `lens search` (their main, in this process) say that hash scores are Hamming-based."""
    query = tmp_path / "query.jpg"
    VARIANTS["jpeg"](photo("moon")).save(query)
    assert main(["index", str(photos), "--methods", "dhash", "--index-dir", str(tmp_path / "i"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(query), "--gallery", str(photos), "--method", "dhash",
                 "--index-dir", str(tmp_path / "i"), "-k", "2"]) == 0
    found = capsys.readouterr().out
    assert "Hamming" in found.splitlines()[0]
    assert "moon.png" in found.splitlines()[1]


@pytest.mark.shared
@pytest.mark.parametrize("name", HASHES)
def test_hash_finds_resized_ukbench_photo(name, tmp_path):
    base = shared_path("data", "near-duplicates", "base_images")
    mixed = shared_path("data", "near-duplicates", "mixed_images")
    gallery = Gallery(base, tmp_path / "idx")
    gallery.index([name], progress=False)
    assert gallery.search(mixed / "ukbench00120_resize.jpg", name, k=1)[0].path == "ukbench00120.jpg"



def test_camera_sized_gallery_jpegs_searched_by_themselves_match_bit_for_bit(tmp_path):
    """Gallery files are decoded exactly as queries are: a scaled decode flips bits (e.g. 2 of
    rocket's dHash bits, 1 of coffee's aHash bits at 1/8 scale)."""
    from PIL import Image
    from skimage import data

    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        photo.resize((photo.width * 4, photo.height * 4), Image.BICUBIC).save(tmp_path / f"{name}.jpg", quality=90)
    gallery = Gallery(tmp_path, tmp_path / "idx")
    gallery.index(HASHES, progress=False)
    for method in HASHES:
        for name in ("astronaut", "coffee", "chelsea", "rocket"):
            [best] = gallery.search(tmp_path / f"{name}.jpg", method, k=1)
            assert (best.path, best.score) == (f"{name}.jpg", 1.0), method
