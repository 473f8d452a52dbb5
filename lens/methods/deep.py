"""Deep embeddings from Hugging Face image backbones (transformers ``AutoModel``).

Presets (defaults are real hub ids; any of them accepts a local folder instead via ``model=``):

============  ==================================  =====================================================
name          default weights                     embedding
============  ==================================  =====================================================
resnet50      microsoft/resnet-50                 global-average-pooled last stage (``pooler_output``),
                                                  2048-d: the penultimate layer of the classifier
vit           facebook/dinov2-small               DINOv2 CLS token after the final layer norm
                                                  (``pooler_output``), 384-d; self-supervised ViT,
                                                  far stronger for retrieval than supervised ViTs
vit-in21k     google/vit-base-patch16-224-in21k   CLS token of the last hidden state (after the final
                                                  layer norm, skipping the untrained tanh pooler), 768-d
hf:<id|path>  any AutoModel image backbone        ``pooler_output`` when the model has one, else the
                                                  mean of the last hidden state; timm-format folders
                                                  load as ``TimmWrapperModel`` (pooled pre-logits)
============  ==================================  =====================================================

Every embedding is L2-normalised and compared by cosine similarity. Preprocessing is exactly the
model's own image processor (``AutoImageProcessor``). Weights load once per process. On CPU the forward
pass runs in ONNX Runtime when it checks out (see :mod:`lens.methods.runtime`; ``LENS_RUNTIME=torch``
keeps eager PyTorch).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from lens.errors import ModelLoadError
from lens.methods import register_method
from lens.types import BaseMethod, MethodInfo, fingerprint_arrays, l2_normalise
from lens.methods.runtime import OnnxForward, Pooled, onnx_forward, runtime_setting

log = logging.getLogger("lens")
_LOADING = threading.Lock()


@dataclass(frozen=True)
class Preset:
    """A named deep method's default weights (a hub id) and its pooling rule: ``pooler`` (the model's
    ``pooler_output``), ``cls`` (the last hidden state's first token), ``mean`` (the mean of the last
    hidden state) or ``auto`` (``pooler_output`` when there is one, else ``mean``).
    """

    model: str
    pooling: str  # "pooler" | "cls" | "mean" | "auto"


PRESETS: dict[str, Preset] = {
    "resnet50": Preset("microsoft/resnet-50", "pooler"),
    "vit": Preset("facebook/dinov2-small", "pooler"),
    "vit-in21k": Preset("google/vit-base-patch16-224-in21k", "cls"),
}


def default_device() -> torch.device:
    """``cuda`` when a CUDA GPU is available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class HFBackbone(BaseMethod):
    """An image backbone from transformers, embedding with one pooling rule."""

    def __init__(self, name: str, model_ref: str, pooling: str = "auto", device: str | None = None,
                 runtime: str | None = None):
        # one backbone loads at a time: transformers' lazy imports and torch.onnx.export are not
        # thread-safe (the app opens two methods at once at start-up)
        with _LOADING:
            self._load(name, model_ref, pooling, device, runtime)

    def _load(self, name: str, model_ref: str, pooling: str, device: str | None, runtime: str | None) -> None:
        from transformers import AutoImageProcessor, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # no load reports or processor-backend notes on stdout
        hf_logging.disable_progress_bar()
        self.device = torch.device(device) if device else default_device()
        model_ref = self.model_ref = os.path.expanduser(model_ref)
        try:
            self.processor = AutoImageProcessor.from_pretrained(model_ref)
            loaded = AutoModel.from_pretrained(model_ref)
        except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors, ...
            raise ModelLoadError(
                f"cannot load model '{model_ref}' for method '{name}': {_first_line(exc)}. "
                "Hub models are downloaded on first use (this needs internet once, then they are "
                f"cached); or pass a local folder: --model {name}=PATH"
            ) from exc
        self.model = self.image_model(loaded).eval().to(self.device)
        self.pooling = pooling
        self._lock = threading.Lock()
        self._onnx: OnnxForward | None = None
        weights = fingerprint_arrays(
            [(k, v.detach().float().cpu().numpy()) for k, v in self.model.state_dict().items()]
        )
        probe = torch.stack([self.prepare(picture) for picture in _probe_pictures()])
        expected = self.features(probe)  # in PyTorch: what an ONNX export must reproduce
        self.decode_size = 2 * max(probe.shape[-2:])  # gallery JPEGs: scaled decoding keeps twice the input
        self.runtime = self._choose_runtime(runtime_setting(runtime), f"{weights}|{pooling}", probe, expected)
        self.info = MethodInfo(
            name=name,
            metric="cosine",
            dim=int(expected.shape[1]),
            model=model_ref,
            weights=weights,
            extra={"pooling": pooling, "architecture": type(self.model).__name__},
        )

    def image_model(self, loaded: torch.nn.Module) -> torch.nn.Module:
        """The module whose ``(pixel_values=...)`` output is pooled: the loaded model itself here; a
        two-tower model's image tower in :class:`lens.methods.clip.ClipMethod`."""
        return loaded

    def _choose_runtime(self, wanted: str, key: str, probe: torch.Tensor, expected: torch.Tensor) -> str:
        """Set up ONNX Runtime for the forward pass when asked and it checks out; returns what runs."""
        if wanted == "torch" or self.device.type != "cpu":
            return "torch"
        try:
            self._onnx = onnx_forward(Pooled(self.model, self.pool).eval(), key, probe, expected)
            return "onnxruntime"
        except Exception as exc:  # export, load or check failed: eager PyTorch still works
            if wanted == "onnx":
                raise ModelLoadError(f"cannot run '{self.model_ref}' in ONNX Runtime: {_first_line(exc)}") from exc
            log.warning("running %s in PyTorch (ONNX Runtime unavailable: %s)", self.model_ref, _first_line(exc))
            return "torch"

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """The model's own image processor (``AutoImageProcessor``: resize, crop, normalise) on one RGB picture:
        ``(3, H, W)`` float32 pixel values (H, W: the processor's size, e.g. 224)."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        """Pooled features of prepared pixel values in one forward pass (ONNX Runtime or PyTorch):
        ``(n, info.dim)`` float32, L2-normalised."""
        return l2_normalise(self.features(torch.stack(list(items))).cpu().numpy())

    @property
    def streams(self) -> int:
        """Batches a bulk embedding runs side by side (see :class:`~lens.types.Method`): one
        per thread of ONNX Runtime's session, each single-threaded; 1 in PyTorch."""
        return self._onnx.threads if self._onnx is not None else 1

    def embed_stream(self, items: Sequence[Any]) -> np.ndarray:
        """``embed_prepared`` in one thread, safe to run in several threads at once (bulk embedding)."""
        if self._onnx is None:
            return self.embed_prepared(items)
        # ONNX Runtime takes numpy arrays: no torch op (and its thread pool) on the streams' threads
        pixels = np.stack([np.asarray(item, dtype=np.float32) for item in items])
        return l2_normalise(self._onnx.single_threaded()(pixels).numpy())

    def release_streams(self) -> None:
        """Free the one-thread session bulk embedding used, with its working memory."""
        if self._onnx is not None:
            self._onnx.release_single_threaded()

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled features of a prepared batch before L2 normalisation (what trained heads start from)."""
        with self._lock, torch.inference_mode():
            if self._onnx is not None:
                return self._onnx(pixel_values)
            return self.pool(self.model(pixel_values=pixel_values.to(self.device))).float()

    def pool(self, outputs: Any) -> torch.Tensor:
        """This backbone's pooling rule applied to a forward pass of ``self.model`` (or a fine-tuned copy)."""
        pooler = getattr(outputs, "pooler_output", None)
        if self.pooling == "pooler" or (self.pooling == "auto" and pooler is not None):
            if pooler is None:
                raise ModelLoadError(f"model '{self.model_ref}' has no pooled output; use a backbone "
                                     "that has one, or a preset with CLS pooling")
            return pooler.flatten(1)
        hidden = outputs.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        # mean: over tokens for (B, N, C), over the spatial grid for (B, C, H, W)
        return hidden.mean(dim=1) if hidden.ndim == 3 else hidden.flatten(2).mean(dim=2)


def _probe_pictures() -> list[Image.Image]:
    """Two fixed pictures (noise and a flat grey) that check an exported model against PyTorch."""
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    return [Image.fromarray(noise), Image.new("RGB", (224, 224), (127, 127, 127))]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _preset_factory(spec: str, model: str | None = None, **options: Any) -> HFBackbone:
    preset = PRESETS[spec]
    return HFBackbone(spec, model or preset.model, preset.pooling, **options)


for _name in PRESETS:
    register_method(_name)(_preset_factory)


@register_method("hf", prefix=True)
def _hf_factory(spec: str, model: str | None = None, **options: Any) -> HFBackbone:
    return HFBackbone(spec, model or spec.partition(":")[2], "auto", **options)
