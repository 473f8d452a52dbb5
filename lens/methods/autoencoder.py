"""Convolutional autoencoder: trained on a gallery's own images, embeds with its encoder's latent.

``lens train autoencoder GALLERY`` (:mod:`lens.training.autoencoder`) trains it to reconstruct the gallery's pictures, squashed to
``image_size`` x ``image_size`` (default 128), through a ``latent_dim`` bottleneck (default 256):
four stride-2 3x3 convolutions (16, 32, 64, 128 channels) and a linear layer encode; a linear layer
and four stride-2 transposed convolutions decode; the loss is the mean squared error of the pixels.

The ``autoencoder`` method embeds a picture with the encoder's latent, L2-normalised (cosine). It
loads ``models/<gallery>-<hash>/autoencoder`` for a gallery, or any model folder: ``--model
autoencoder=PATH`` or the spec ``autoencoder:PATH``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lens.errors import LensError, ModelLoadError
from lens.methods import register_method
from lens.types import BaseMethod, MethodInfo, l2_normalise
from lens.trained import fingerprint, load_model, load_trainable, model_folder

KIND = "autoencoder"
CHANNELS = (16, 32, 64, 128)


class ConvAutoencoder(nn.Module):
    """The network (see the module): ``(n, 3, S, S)`` float pixels in [0, 1] -> ``latent_dim`` encoder
    latent -> ``(n, 3, S, S)`` reconstruction in [0, 1] (sigmoid), S = ``image_size``.

    Raises :class:`LensError` when ``image_size`` is not a multiple of ``2 ** len(channels)`` (16).
    """

    def __init__(self, image_size: int = 128, latent_dim: int = 256, channels: Sequence[int] = CHANNELS):
        super().__init__()
        side = image_size // 2 ** len(channels)
        if side < 1 or side * 2 ** len(channels) != image_size:
            raise LensError(f"image size {image_size} must be a multiple of {2 ** len(channels)}")
        widths = [3, *channels]
        down: list[nn.Module] = []
        for cin, cout in zip(widths, widths[1:]):
            down += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(widths[-1] * side * side, latent_dim))
        up: list[nn.Module] = [nn.Linear(latent_dim, widths[-1] * side * side), nn.ReLU(inplace=True),
                               nn.Unflatten(1, (widths[-1], side, side))]
        for cin, cout in zip(widths[:0:-1], widths[-2::-1]):
            up += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        up[-1] = nn.Sigmoid()  # pixels in [0, 1]
        self.decoder = nn.Sequential(*up)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``pixels``: ``(n, 3, S, S)`` float in [0, 1] in, the same shape out."""
        return self.decoder(self.encoder(pixels))


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """The network's input for a picture: squashed to size x size, uint8 (3, size, size)."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _network(config: dict[str, Any]) -> ConvAutoencoder:
    return ConvAutoencoder(config["image_size"], config["latent_dim"], config["channels"])


class AutoencoderMethod(BaseMethod):
    """Embeds with the latent of a trained :class:`ConvAutoencoder`."""

    def __init__(self, name: str, folder: str | Path, device: str | None = None):
        tensors, config = load_model(folder, KIND)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = _network(config)
        try:
            load_trainable(self.net, tensors)
        except LensError as exc:
            raise ModelLoadError(f"the autoencoder in '{folder}' does not fit its config.json: {exc}") from exc
        self.net.eval().to(self.device)
        self.size = int(config["image_size"])
        self.decode_size = 2 * self.size
        self._lock = threading.Lock()
        self.info = MethodInfo(
            name=name, metric="cosine", dim=int(config["latent_dim"]), model=str(folder),
            weights=fingerprint(tensors, config),
            extra={"architecture": "conv-autoencoder", "image_size": self.size},
        )

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """The picture squashed to ``image_size`` x ``image_size`` (bilinear): ``(3, S, S)`` uint8
        (:func:`to_pixels`)."""
        return to_pixels(image, self.size)

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        """The encoder's latents of prepared pixels (scaled to [0, 1]): ``(n, latent_dim)`` float32, L2-normalised."""
        batch = torch.stack(list(items)).to(self.device).float() / 255
        with self._lock, torch.inference_mode():
            return l2_normalise(self.net.encoder(batch).float().cpu().numpy())


@register_method(KIND, trained=True)
@register_method(KIND, prefix=True)
def _factory(spec: str, model: str | None = None, **options: Any) -> AutoencoderMethod:
    return AutoencoderMethod(spec, model_folder(KIND, spec, model), **options)
