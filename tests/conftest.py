"""Shared fixtures: tiny random-initialised models saved to disk, generated image folders, ../shared."""

from __future__ import annotations

import os
import tempfile

# Tests never reach a model hub or pip: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
# ONNX exports of the tests' tiny models go to a fresh folder, not the user's cache.
os.environ.setdefault("LENS_CACHE_DIR", tempfile.mkdtemp(prefix="lens-test-cache-"))

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str | Path) -> Path:
    """A path inside ../shared (or an absolute path), or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (../shared data/weights are not present on this machine)")
    return path


def make_picture(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A distinct synthetic picture: a coloured background with a few random shapes."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x1, y1 = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 20)
        x2, y2 = x1 + rng.integers(10, 40), y1 + rng.integers(10, 40)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((x1, y1, x2, y2), fill=colour)
        else:
            draw.ellipse((x1, y1, x2, y2), fill=colour)
    return image


def write_gallery(folder: Path, count: int, start_seed: int = 0) -> list[Path]:
    """``count`` generated JPEG/PNG images in ``folder`` (and a sub-folder, to test recursion)."""
    paths = []
    for i in range(count):
        sub = folder / ("nested" if i % 3 == 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{start_seed + i:03d}.{'png' if i % 2 else 'jpg'}"
        make_picture(start_seed + i).save(path, quality=95)
        paths.append(path)
    return paths


def _save_tiny_resnet(folder: Path, seed: int, hidden: int) -> Path:
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, hidden], depths=[1, 1], num_channels=3)
    ResNetModel(config).eval().save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(folder)
    return folder


def _save_tiny_dinov2(folder: Path, seed: int) -> Path:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, image_size=64, patch_size=16)
    Dinov2Model(config).eval().save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory) -> Path:
    """A tiny random-initialised transformers ResNet (16-d pooled output) saved as a model folder."""
    return _save_tiny_resnet(tmp_path_factory.mktemp("tiny-resnet"), seed=0, hidden=16)


@pytest.fixture(scope="session")
def tiny_resnet_other(tmp_path_factory) -> Path:
    """Another tiny ResNet with other weights and another dimension (24-d)."""
    return _save_tiny_resnet(tmp_path_factory.mktemp("tiny-resnet-other"), seed=1, hidden=24)


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A tiny random-initialised DINOv2 ViT (32-d CLS) saved as a model folder."""
    return _save_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2"), seed=0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The near-duplicate test photos (tests/near_duplicates.py) in a folder, written once per module."""
    from near_duplicates import write_photos

    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder)
    return folder


@pytest.fixture()
def gallery_dir(tmp_path) -> Path:
    folder = tmp_path / "photos"
    write_gallery(folder, 12)
    return folder


def index_dir_seen_from(cwd: Path, gallery: Path) -> Path:
    """Where `lens index GALLERY` run in ``cwd`` puts the gallery's indexes (the default index folder)."""
    from lens.gallery import default_index_dir

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return cwd / default_index_dir(gallery)
    finally:
        os.chdir(previous)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random-initialised CLIP (16-d) with its image processor and a word-level tokenizer."""
    from tiny_clip import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> Path:
    """A tiny random-initialised SigLIP (32-d) with its image processor and a word-level tokenizer."""
    from tiny_clip import save_tiny_siglip

    return save_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"))


@pytest.fixture(scope="session")
def shapes_clip(tmp_path_factory) -> Path:
    """A tiny CLIP trained (once per session) on coloured shapes and captions: 'red', 'a blue square', ..."""
    from tiny_clip import train_shapes_clip

    return train_shapes_clip(tmp_path_factory.mktemp("shapes-clip"))
