"""Index backends: FAISS (Flat, HNSW, IVF-PQ, PQ, binary), LSH codes, Annoy hamming; exact re-ranking."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import pytest
from near_duplicates import VARIANTS, photo, write_photos

from lens import Gallery
from lens.errors import LensError
from lens.index import create_index, load_index, rerank_exact
from lens.methods import register_method
from lens.types import BaseMethod, MethodInfo, l2_normalise


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 200) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (like real embeddings, not uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return l2_normalise(centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim)))


def exact(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    similarities = queries @ vectors.T
    ids = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(similarities, ids, axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def round_trip(spec: str, vectors: np.ndarray, folder: Path, metric: str = "cosine", dim: int | None = None):
    dim = dim or vectors.shape[1]
    index = create_index(spec, dim, metric)
    index.build(vectors)
    files = index.save(folder)
    assert all((folder / name).stat().st_size > 0 for name in files)
    return index, load_index(folder, spec, dim, metric)


DATA, QUERIES = np.split(clustered(3050, 64), [3000])  # queries: from the same clusters, not in DATA
TRUE_IDS, TRUE_SIMS = exact(DATA, QUERIES, 10)


def test_faiss_flat_equals_exact_numpy_search_after_save_and_load(tmp_path):
    built, loaded = round_trip("faiss:Flat", DATA, tmp_path)
    for index in (built, loaded):
        ids, sims = index.search(QUERIES, 10)
        assert np.array_equal(ids, TRUE_IDS)
        assert sims == pytest.approx(np.clip(TRUE_SIMS, 0, 1), abs=1e-5)
    assert len(loaded) == len(DATA)


@pytest.mark.parametrize("spec, at_least", [
    ("faiss:HNSW32:efSearch=128", 0.95),
    ("faiss:IVF32,Flat:nprobe=8", 0.95),
    ("faiss:IVF32,PQ16x4:nprobe=8", 0.6),
    ("faiss:PQ16x4", 0.6),
    ("lsh:256", 0.7),
    ("annoy:trees=20", 0.95),
])
def test_approximate_backends_recall_and_round_trip(tmp_path, spec, at_least):
    built, loaded = round_trip(spec, DATA, tmp_path)
    found, sims = loaded.search(QUERIES, 10)
    assert recall(found, TRUE_IDS) >= at_least, spec
    assert np.array_equal(found, built.search(QUERIES, 10)[0])  # the files hold the same index
    assert ((0 <= sims) & (sims <= 1)).all() and (np.diff(sims, axis=1) <= 1e-6).all()


def test_search_parameters_are_applied_again_after_loading(tmp_path):
    _, loaded = round_trip("faiss:HNSW16:efSearch=77", DATA, tmp_path)
    assert faiss.downcast_index(loaded._index).hnsw.efSearch == 77
    _, loaded = round_trip("faiss:IVF16,Flat:nprobe=5", DATA, tmp_path)
    assert faiss.extract_index_ivf(loaded._index).nprobe == 5


def test_codes_are_compact(tmp_path):
    for spec, bytes_per_vector in (("faiss:PQ16x4", 8), ("lsh:256", 32)):
        folder = tmp_path / spec.replace(":", "-")
        folder.mkdir()
        round_trip(spec, DATA, folder)
        size = (folder / "index.faiss").stat().st_size
        assert len(DATA) * bytes_per_vector <= size < len(DATA) * bytes_per_vector + 200_000, spec


def test_exact_reranking_of_code_candidates_recovers_exact_results():
    index = create_index("lsh:128:rerank=200", 64, "cosine")
    index.build(DATA)
    assert index.rerank == 200
    candidates, _ = index.search(QUERIES, 200)
    ids, sims = rerank_exact(QUERIES, candidates, DATA, "cosine", 64, 10)
    assert recall(ids, TRUE_IDS) > recall(index.search(QUERIES, 10)[0], TRUE_IDS)
    assert recall(ids, TRUE_IDS) >= 0.9
    hits = ids == TRUE_IDS
    assert sims[hits] == pytest.approx(TRUE_SIMS[hits], abs=1e-5)


def test_annoy_and_faiss_hamming_on_packed_codes(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (500, 8), dtype=np.uint8)
    queries = codes[:20].copy()
    queries[:, 0] ^= 0b101  # two bits away from their originals
    for spec in ("annoy", "faiss:BFlat"):
        folder = tmp_path / spec.replace(":", "-")
        folder.mkdir()
        _, loaded = round_trip(spec, codes, folder, metric="hamming", dim=64)
        ids, sims = loaded.search(queries, 3)
        assert np.array_equal(ids[:, 0], np.arange(20)), spec
        assert sims[:, 0] == pytest.approx(1 - 2 / 64)


@pytest.mark.parametrize("spec, message", [
    ("faiss:NoSuchIndex", "cannot make an index"),
    ("faiss:HNSW32:nprobe=4", "does not apply"),
    ("faiss:Flat:efSearch", "key=value"),
    ("lsh:12", "multiple of 8"),
    ("lsh:abc", "lsh:BITS"),
    ("lsh:64:trees=3", "unknown lsh option"),
])
def test_bad_specs_get_clear_messages(spec, message):
    with pytest.raises(LensError, match=message):
        create_index(spec, 64, "cosine").build(DATA[:300])


def test_training_needs_enough_vectors():
    with pytest.raises(LensError, match="at least as large as number of clusters.*faiss:Flat"):
        create_index("faiss:IVF256,PQ8", 64, "cosine").build(DATA[:100])


# -- through the gallery, with a small float method registered by the test -------------------------
class ColourLayout(BaseMethod):
    """A tiny float method: the 8 x 8 thumbnail's colours (192-d), enough to tell photos apart."""

    info = MethodInfo(name="test-colour-layout", metric="cosine", dim=192, weights="none")

    def prepare(self, image):
        return np.asarray(image.resize((8, 8)), dtype=np.float32).reshape(-1) - 128.0

    def embed_prepared(self, items: Sequence[np.ndarray]) -> np.ndarray:
        return l2_normalise(np.stack(items))


register_method("test-colour-layout")(lambda spec, model=None, **options: ColourLayout())


@pytest.mark.parametrize("spec", ["faiss:HNSW32", "lsh:64:rerank=8", "faiss:PQ8x3:rerank=8"])
def test_gallery_searches_float_codes_and_reranks_exactly(tmp_path, spec):
    photos = tmp_path / "photos"
    write_photos(photos)
    gallery = Gallery(photos, tmp_path / "idx")
    gallery.index(["test-colour-layout"], index_spec=spec, progress=False)
    exact_gallery = Gallery(photos, tmp_path / "flat")
    exact_gallery.index(["test-colour-layout"], index_spec="faiss:Flat", progress=False)
    query = VARIANTS["jpeg"](photo("astronaut"))
    results = Gallery(photos, tmp_path / "idx").search(query, "test-colour-layout", k=3)
    assert results[0].path == "astronaut.png" and results[0].kind == "cosine"
    reference = exact_gallery.search(query, "test-colour-layout", k=3)
    if "rerank" in spec:  # re-ranked from the stored float vectors: the exact scores
        assert [r.score for r in results] == pytest.approx([r.score for r in reference], abs=1e-5)
    brute = gallery.search(query, "test-colour-layout", k=3, rerank="all")
    assert [(r.path, round(r.score, 5)) for r in brute] == [(r.path, round(r.score, 5)) for r in reference]
