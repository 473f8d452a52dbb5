"""A real gallery with an index for every method, shared by the serving benchmarks.

``prepare(work, images)`` links ``images`` clothing photos into ``work/gallery``, trains the
autoencoder and the Siamese head briefly on them (a trained model's query cost does not depend on
how well it is trained), and indexes every method into ``work/indexes``. Reuses what ``work`` holds.

Methods: EfficientNet-Lite0 (real ImageNet weights, ``hf:`` spec), the ``resnet50`` and ``vit``
presets' architectures random-initialised (no such weights here; speed does not depend on values),
``phash``, ``sift``, ``autoencoder`` and ``siamese`` (on EfficientNet-Lite0).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.build_throughput import CLOTHING, EFFNET, architecture_folders

SHARED_TEST = CLOTHING.parent / "test"  #: query photos, not in the gallery
METHOD_ORDER = ["effnet", "resnet50", "vit", "siamese", "autoencoder", "phash", "sift"]


def prepare(work: Path, images: int, methods: list[str] | None = None) -> tuple[Path, Path, dict[str, str],
                                                                                 dict[str, str]]:
    """(gallery folder, index folder, {name: spec}, {spec: model}) with every method indexed."""
    from lens import Gallery
    from lens.images import iter_image_files
    from lens.training import autoencoder, siamese

    work.mkdir(parents=True, exist_ok=True)
    gallery_dir, index_dir, models_dir = work / "gallery", work / "indexes", work / "models"
    if not gallery_dir.exists():
        files = list(iter_image_files(CLOTHING))
        files = [files[i] for i in np.random.default_rng(1).permutation(len(files))[:images]]
        staging = work / "gallery.partial"
        staging.mkdir(exist_ok=True)
        for path in files:  # keep the class folders: labels for the Siamese head
            target = staging / path.parent.name / path.name
            target.parent.mkdir(exist_ok=True)
            if not target.exists():
                target.symlink_to(path.resolve())
        staging.rename(gallery_dir)
    folders = architecture_folders(work)
    effnet = f"hf:{EFFNET}"
    specs = {"effnet": effnet, "resnet50": "resnet50", "vit": "vit", "siamese": "siamese",
             "autoencoder": "autoencoder", "phash": "phash", "sift": "sift"}
    models = {"resnet50": folders["resnet50"][1], "vit": folders["vit"][1],
              "siamese": str(models_dir / "siamese"), "autoencoder": str(models_dir / "autoencoder")}
    wanted = methods or METHOD_ORDER
    if "siamese" in wanted and not (models_dir / "siamese" / "model.safetensors").exists():
        siamese.train(gallery_dir, models_dir / "siamese", replace(siamese.SIAMESE_DEFAULTS, epochs=2),
                      backbone=effnet, progress=False)
    if "autoencoder" in wanted and not (models_dir / "autoencoder" / "model.safetensors").exists():
        autoencoder.train(gallery_dir, models_dir / "autoencoder", replace(autoencoder.DEFAULTS, epochs=1),
                          progress=False)
    gallery = Gallery(gallery_dir, index_dir, models=models)
    for name in wanted:
        if not (index_dir / gallery.method_dir(specs[name]).name / "CURRENT").exists():
            [report] = gallery.index([specs[name]], progress=False)
            print(f"  indexed {name}: {report.count} images in {report.seconds:.0f} s", flush=True)
    return gallery_dir, index_dir, {n: specs[n] for n in wanted}, models


def environment() -> str:
    import torch

    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
