"""CLIP-family two-tower models (transformers ``CLIPModel``, ``SiglipModel``): images and words in one space.

============  ==================================  ==================================================
name          default weights                     embedding
============  ==================================  ==================================================
clip          openai/clip-vit-base-patch32        ``get_image_features`` (the projected image
                                                  embedding), 512-d; text: ``get_text_features``
siglip        google/siglip-base-patch16-224      the same for SigLIP (sigmoid-loss CLIP), 768-d
clip:<id>     any CLIP-family hub id or folder    the same; e.g. ``clip:./my-clip`` or
                                                  ``--model clip=laion/CLIP-ViT-B-32-laion2B-s34B-b79K``
============  ==================================  ==================================================

Gallery images are indexed with the image tower like any method (L2-normalised, cosine). The text
tower loads with it: :meth:`ClipMethod.embed_text` embeds words into the same space, so a gallery
is searched by text, or by a photo refined by words (:func:`lens.search.search_text`). Both
follow Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(ICML 2021) and Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (ICCV 2023).

Preprocessing is the model's own: its image processor (``AutoImageProcessor``) and its tokenizer
(``AutoTokenizer``), padded to the text tower's full length (``max_position_embeddings``: 77 for
CLIP, 64 for SigLIP, as transformers' zero-shot pipeline pads SigLIP; CLIP's causal text tower pools
the end-of-text token, so the padding does not change its features). On CPU both towers run in ONNX
Runtime, each exported once and checked against PyTorch (:mod:`lens.methods.runtime`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from lens.errors import LensError, ModelLoadError
from lens.methods import register_method
from lens.methods.deep import HFBackbone, _first_line
from lens.methods.runtime import OnnxForward, onnx_forward, runtime_setting
from lens.types import l2_normalise

log = logging.getLogger("lens")

PRESETS = {"clip": "openai/clip-vit-base-patch32", "siglip": "google/siglip-base-patch16-224"}
#: What the text tower takes from the tokenizer's output (others, e.g. token_type_ids, are dropped).
TEXT_INPUTS = ("input_ids", "attention_mask")
#: Longest query text, in characters (a tokenizer truncates at its own length anyway).
MAX_TEXT = 1000


class ImageTower(torch.nn.Module):
    """A two-tower model's image side: ``pixel_values`` in, ``get_image_features``' output out
    (its ``pooler_output`` is the projected image embedding)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> Any:
        """``get_image_features`` of ``(n, 3, H, W)`` float pixel values (the processor's): the projected image
        embeddings, ``(n, dim)`` (or an output whose ``pooler_output`` they are)."""
        return self.model.get_image_features(pixel_values=pixel_values)


class TextTower(torch.nn.Module):
    """A two-tower model's text side: token ids (and mask) in, the projected text embedding out."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The projected text embeddings ``(n, dim)`` float32 of ``(n, L)`` int64 inputs given in ``names`` order
        (``input_ids``, and ``attention_mask`` when the tokenizer makes one); not normalised."""
        output = self.model.get_text_features(**dict(zip(self.names, inputs)))
        return getattr(output, "pooler_output", output).float()


class ClipMethod(HFBackbone):
    """A CLIP-family model: the image tower indexes pictures, the text tower embeds words.

    ``embed`` / ``embed_prepared``: ``(n, dim)`` float32 L2-normalised image embeddings;
    :meth:`embed_text`: ``(n, dim)`` float32 L2-normalised text embeddings in the same space.
    Raises :class:`ModelLoadError` when the model cannot load or has no text tower.
    """

    def _load(self, name: str, model_ref: str, pooling: str, device: str | None, runtime: str | None) -> None:
        from transformers import AutoTokenizer

        super()._load(name, model_ref, pooling, device, runtime)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_ref)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the tokenizer of '{self.model_ref}' for method '{name}': "
                                 f"{_first_line(exc)}") from exc
        two_tower = self.model.model
        config = getattr(two_tower.config, "text_config", None)
        self.text_length = int(getattr(config, "max_position_embeddings", 0) or 64)
        self._text_onnx: OnnxForward | None = None
        probe = self.tokenize(["a photo of a cat", "a red dress"])
        self.text_names = tuple(probe)
        self._text = TextTower(two_tower, self.text_names).eval()
        expected = self._text_torch(probe)
        if self.runtime == "onnxruntime":
            try:
                self._text_onnx = onnx_forward(self._text, f"{self.info.weights}|text", tuple(probe.values()),
                                               expected, names=self.text_names)
            except Exception as exc:  # the image tower still runs in ONNX Runtime; words in PyTorch
                if runtime_setting(runtime) == "onnx":
                    raise ModelLoadError(f"cannot run the text tower of '{self.model_ref}' in ONNX Runtime: "
                                         f"{_first_line(exc)}") from exc
                log.warning("running the text tower of %s in PyTorch (ONNX Runtime: %s)",
                            self.model_ref, _first_line(exc))
        self.info = replace(self.info, extra={**self.info.extra, "architecture": type(two_tower).__name__,
                                              "text": True})

    def image_model(self, loaded: torch.nn.Module) -> torch.nn.Module:
        """The image tower of a two-tower model (:class:`ImageTower`). Raises :class:`ModelLoadError` for a model
        without ``get_image_features`` and ``get_text_features`` (not CLIP-family)."""
        if not (hasattr(loaded, "get_image_features") and hasattr(loaded, "get_text_features")):
            raise ModelLoadError(
                f"'{self.model_ref}' ({type(loaded).__name__}) is not a CLIP-family model with an image and a "
                f"text tower; for an image-only backbone use the method hf:{self.model_ref}"
            )
        return ImageTower(loaded)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's own tokenizer on ``texts``, padded to the text tower's full length:
        ``{"input_ids": (n, L) int64[, "attention_mask": (n, L) int64]}``."""
        encoded = self.tokenizer(list(texts), padding="max_length", max_length=self.text_length,
                                 truncation=True, return_tensors="pt")
        return {name: encoded[name].long() for name in TEXT_INPUTS if name in encoded}

    def _text_torch(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return self._text(*(tokens[name].to(self.device) for name in self.text_names)).float().cpu()

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings before L2 normalisation, ``(n, dim)`` float32 (``get_text_features``)."""
        texts = [str(text).strip()[:MAX_TEXT] for text in texts]
        if not texts or not all(texts):
            raise LensError("the words to search for are empty")
        tokens = self.tokenize(texts)
        with self._lock:
            if self._text_onnx is not None:
                return self._text_onnx(*(tokens[name] for name in self.text_names))
            return self._text_torch(tokens)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Text embeddings ``(n, dim)`` float32, L2-normalised: cosine with the image vectors."""
        return l2_normalise(self.text_features(texts).numpy())

    @property
    def text_runtime(self) -> str:
        """What runs the text tower: ``onnxruntime`` or ``torch``."""
        return "onnxruntime" if self._text_onnx is not None else "torch"


def _preset_factory(spec: str, model: str | None = None, **options: Any) -> ClipMethod:
    return ClipMethod(spec, model or PRESETS[spec], "pooler", **options)


for _name in PRESETS:
    register_method(_name)(_preset_factory)


@register_method("clip", prefix=True)
def _clip_factory(spec: str, model: str | None = None, **options: Any) -> ClipMethod:
    return ClipMethod(spec, model or spec.partition(":")[2], "pooler", **options)
