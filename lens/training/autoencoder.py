"""Training the ``autoencoder`` method (:mod:`lens.methods.autoencoder`): reconstruct the gallery's pictures.

The loss is the mean squared error of the pixels (pictures randomly mirrored while training).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lens.errors import LensError
from lens.methods.autoencoder import CHANNELS, KIND, ConvAutoencoder, _network, to_pixels
from lens.training import TrainSettings, get_trainer
from lens.training.loop import TrainReport, load_all, train_and_save, training_data

DEFAULTS = get_trainer(KIND).defaults  #: see lens.training.TRAINERS


class _Reconstruction:
    """The objective: reconstruct the pictures (randomly mirrored while training)."""

    def __init__(self, net: ConvAutoencoder, pixels: torch.Tensor, device: torch.device):
        self.module, self.pixels, self.device = net, pixels, device

    def loss(self, batch: np.ndarray, rng: np.random.Generator, train: bool) -> torch.Tensor:
        x = self.pixels[torch.from_numpy(batch)].to(self.device).float() / 255
        if train:
            mirror = torch.from_numpy(rng.random(len(batch)) < 0.5).to(self.device)
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return F.mse_loss(self.module(x), x)


def train(
    gallery: str | Path,
    out: str | Path,
    settings: TrainSettings = DEFAULTS,
    *,
    image_size: int = 128,
    latent_dim: int = 256,
    resume: bool = False,
    progress: bool = True,
    workers: int = 2,
    only: Sequence[str] | None = None,
) -> TrainReport:
    """Train an autoencoder on the images of ``gallery`` and write it to the model folder ``out``.

    ``only``: train on these images of ``gallery`` (paths relative to it) instead of all of them.
    """
    started = time.perf_counter()
    settings, out = settings.checked(), Path(out)
    config = {"kind": KIND, "image_size": image_size, "latent_dim": latent_dim, "channels": list(CHANNELS)}
    torch.manual_seed(settings.seed)
    net = _network(config)  # checks the sizes before any image is read
    data = training_data(gallery, labels="none", only=only)
    pictures, rows = load_all(data.files(), lambda image: to_pixels(image, image_size),
                              workers=workers, progress=progress, desc="reading images")
    data.keep(rows)
    if len(pictures) < 2:
        raise LensError(f"need at least 2 readable images in '{gallery}' to train, found {len(pictures)}")
    device = settings.torch_device()
    objective = _Reconstruction(net.to(device), torch.stack(pictures), device)
    return train_and_save(KIND, out, objective, data, config, settings, resume=resume, progress=progress,
                          started=started, options={"image_size": image_size, "latent_dim": latent_dim})
