"""Find the objects in a photo, pick its main subject, and crop regions to search with.

    >>> from lens.detect import DEFAULT_MARGIN, create_detector, main_subject
    >>> from lens.images import crop
    >>> detector = create_detector("yolo")                 # loaded once per process
    >>> boxes = detector.detect(image)                     # list[Box], best first
    >>> subject = main_subject(boxes, image.size)          # None when nothing was found
    >>> region = crop(image, subject, DEFAULT_MARGIN)      # what the similarity methods embed

Detectors (``create_detector(name, weights=None, **options)``):

==========  =====================================================================================
name        weights
==========  =====================================================================================
yolo        ultralytics YOLO. Default ``yolo11n.pt`` (COCO, 80 classes): ultralytics downloads it on
            first use (needs internet once) into ``$TORCH_HOME/hub/checkpoints``. Any local ``.pt``,
            ``.onnx`` or ``.tflite`` export is accepted (``.onnx`` needs ``onnxruntime``).
retinanet   torchvision ``retinanet_resnet50_fpn_v2``. Default: its ``COCO_V1`` weights through the
            torchvision weights API, downloaded by torchvision on first use into the same cache.
            Or a local state dict (``.pth``/``.pt`` read with ``torch.load(weights_only=True)``, or
            ``.safetensors``), or ``"random"``: random initialisation (tests, speed measurements).
==========  =====================================================================================

Options: ``conf`` (score threshold, 0.25), ``iou`` (NMS IoU threshold, 0.45), ``max_boxes`` (20),
``imgsz`` (the longest side fed to the network: 640 for yolo; for retinanet ``None`` keeps
torchvision's rule, shorter side 800 and longer side at most 1333).

Boxes are ``x1, y1, x2, y2`` in pixels of the image given to ``detect`` (after EXIF orientation),
clamped to it, best score first.

**Main subject rule** (:func:`main_subject`): among the detected boxes, the one with the highest

    score x sqrt(a) x (1 - a^2) x (1 - distance(box centre, image centre) / half diagonal)

where ``a`` is the box's share of the image area. A confident, large, central object wins; the
square root keeps a big object from always beating a smaller confident one in the middle, and
``1 - a^2`` sets aside boxes that fill the frame (the dining table under the cup): searching them
is searching the whole image, which is always an option anyway. Checked on
``../shared/data/coco-mini`` in ``tests/test_detect.py`` (figures in ``docs/detection.md``).

Searches from a detector's box crop it with :data:`DEFAULT_MARGIN` (5% of its width and height on
each side, for context; the rule is :func:`lens.images.crop`'s).

Offline: ultralytics is told never to pip-install (``YOLO_AUTOINSTALL=0``) and to treat the machine
as offline (``YOLO_OFFLINE=1``: no update checks or analytics); a local weights file is loaded
without any network access, and a missing one is a :class:`~lens.errors.ModelLoadError` that says
where to get it, before ultralytics is asked for anything.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# Before ultralytics is imported anywhere: never pip-install, no online checks, no chatter on stdout.
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from lens.errors import LensError, ModelLoadError  # noqa: E402
from lens.images import ImageSource, load_image  # noqa: E402
from lens.types import Box  # noqa: E402

__all__ = [
    "BaseDetector",
    "Box",
    "Detector",
    "box_at",
    "create_detector",
    "list_detectors",
    "main_subject",
    "register_detector",
]

DEFAULT_CONF = 0.25
DEFAULT_IOU = 0.45
DEFAULT_MAX_BOXES = 20
#: The context margin a detected box is searched with: a fraction of its width / height on each side.
DEFAULT_MARGIN = 0.05


@runtime_checkable
class Detector(Protocol):
    """Finds objects in a picture. ``detect`` returns boxes best first; it is safe to call from threads."""

    name: str
    weights: str  #: what was loaded: a file path, a model name or ``COCO_V1`` / ``random``

    def detect(self, image: ImageSource) -> list[Box]:
        """Boxes in pixels of ``image`` (after EXIF orientation), clamped to it, best score first."""

    def detect_many(self, images: Sequence[ImageSource]) -> list[list[Box]]:
        """:meth:`detect` for a batch: one list of boxes per image. Raises ImageError for a bad image."""


# -- boxes -----------------------------------------------------------------------------------------
def boxes_from_arrays(
    xyxy: np.ndarray,
    scores: np.ndarray,
    labels: Sequence[str],
    image_size: tuple[int, int],
    max_boxes: int | None = None,
) -> list[Box]:
    """Boxes from a detector's raw outputs: clamped to the image, empty ones dropped, best first."""
    width, height = image_size
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    xyxy = np.clip(xyxy, 0.0, [width, height, width, height])
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    boxes = []
    for i in order:
        x1, y1, x2, y2 = (float(v) for v in xyxy[i])
        if x2 - x1 > 0 and y2 - y1 > 0:
            boxes.append(Box(x1, y1, x2, y2, labels[i], float(scores[i])))
    return boxes[:max_boxes] if max_boxes is not None else boxes


def main_subject(boxes: Sequence[Box], image_size: tuple[int, int]) -> Box | None:
    """The box the user most likely means (rule in the module docstring); ``None`` if there are none."""
    if not boxes:
        return None
    width, height = image_size
    half_diagonal = math.hypot(width, height) / 2

    def weight(box: Box) -> float:
        share = min(1.0, box.area / (width * height))
        off_centre = math.hypot((box.x1 + box.x2 - width) / 2, (box.y1 + box.y2 - height) / 2)
        centred = max(0.0, 1.0 - off_centre / half_diagonal)
        return box.score * math.sqrt(share) * (1.0 - share**2) * centred

    return max(boxes, key=weight)


def box_at(boxes: Sequence[Box], x: float, y: float) -> int | None:
    """Index of the smallest box containing the point (x, y), e.g. where the user clicked; else ``None``."""
    hits = [i for i, box in enumerate(boxes) if box.contains(x, y)]
    return min(hits, key=lambda i: boxes[i].area) if hits else None


class BaseDetector:
    """What every detector shares: thresholds, a lock, and ``detect`` composed from ``_detect``."""

    name: str
    weights: str

    def __init__(
        self,
        *,
        conf: float = DEFAULT_CONF,
        iou: float = DEFAULT_IOU,
        max_boxes: int = DEFAULT_MAX_BOXES,
        imgsz: int | None = None,
        device: str | None = None,
    ):
        if not 0.0 <= conf <= 1.0:
            raise LensError(f"the score threshold (conf) must be between 0 and 1, got {conf}")
        if not 0.0 < iou <= 1.0:
            raise LensError(f"the NMS IoU threshold must be in (0, 1], got {iou}")
        if max_boxes < 1:
            raise LensError(f"max_boxes must be at least 1, got {max_boxes}")
        self.conf, self.iou, self.max_boxes, self.imgsz, self.device = conf, iou, max_boxes, imgsz, device
        self._lock = threading.Lock()  # a model / ultralytics predictor is not safe to share between threads

    def detect(self, image: ImageSource) -> list[Box]:
        """Boxes in pixels of ``image`` (a path, bytes, PIL image or HxWxC uint8 array, EXIF-oriented),
        clamped to it, best score first, at most ``max_boxes``, each with score >= ``conf``.

        Raises :class:`~lens.images.ImageError` for an image that cannot be decoded."""
        return self.detect_many([image])[0]

    def detect_many(self, images: Sequence[ImageSource]) -> list[list[Box]]:
        """:meth:`detect` for a batch, decoded once each and run as one model call under the
        detector's lock (one list of boxes per image, in order). Raises
        :class:`~lens.images.ImageError` for an image that cannot be decoded."""
        pictures = [load_image(image) for image in images]
        if not pictures:
            return []
        with self._lock:
            return self._detect(pictures)

    def _detect(self, pictures: list[Image.Image]) -> list[list[Box]]:  # pragma: no cover - abstract
        raise NotImplementedError


# -- registry ----------------------------------------------------------------------------------------
DetectorFactory = Callable[..., Detector]
_FACTORIES: dict[str, DetectorFactory] = {}
_CACHE: dict[tuple[Any, ...], Detector] = {}
_LOCK = threading.Lock()


def register_detector(name: str) -> Callable[[DetectorFactory], DetectorFactory]:
    """Register ``factory(weights=None, **options) -> Detector`` under ``name``."""

    def decorator(factory: DetectorFactory) -> DetectorFactory:
        _FACTORIES[name] = factory
        return factory

    return decorator


def list_detectors() -> list[str]:
    """The registered detector names (``retinanet``, ``yolo``, ...), sorted."""
    return sorted(_FACTORIES)


def create_detector(name: str = "yolo", weights: str | os.PathLike | None = None, **options: Any) -> Detector:
    """The detector ``name`` with ``weights`` (``None``: its default), loaded once per process.

    ``options``: ``conf``, ``iou``, ``max_boxes``, ``imgsz``, ``device`` (see the module docstring).
    """
    if name not in _FACTORIES:
        raise LensError(f"unknown detector '{name}'; known detectors: {', '.join(list_detectors())}")
    if weights is not None:
        weights = os.fspath(weights)
        if os.path.exists(os.path.expanduser(weights)):
            weights = os.path.abspath(os.path.expanduser(weights))
    key = (name, weights, tuple(sorted(options.items())))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _FACTORIES[name](weights, **options)
        return _CACHE[key]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _weights_cache() -> Path:
    """Where downloaded detector weights are kept: torch's checkpoint cache (``$TORCH_HOME``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- YOLO (ultralytics) ------------------------------------------------------------------------------
YOLO_DEFAULT_WEIGHTS = "yolo11n.pt"


class YoloDetector(BaseDetector):
    """An ultralytics YOLO detection model (``.pt``, ``.onnx`` or ``.tflite``); ``imgsz`` defaults to 640."""

    name = "yolo"

    def __init__(self, weights: str | None = None, **options: Any):
        super().__init__(**options)
        self.imgsz = self.imgsz or 640
        self.weights = _resolve_yolo_weights(weights or YOLO_DEFAULT_WEIGHTS)
        try:
            from ultralytics import YOLO

            self.model = YOLO(self.weights, task="detect")
            # Run once now so that a backend problem (missing runtime, bad file) shows at load time.
            self._detect([Image.new("RGB", (64, 48))])
        except Exception as exc:  # ultralytics raises OSError, RuntimeError, ModuleNotFoundError, ...
            raise ModelLoadError(
                f"cannot load YOLO weights '{self.weights}': {_first_line(exc)}"
                + (" (.onnx weights need the package onnxruntime)" if self.weights.endswith(".onnx") else "")
            ) from exc

    def _detect(self, pictures: list[Image.Image]) -> list[list[Box]]:
        # device None: ultralytics picks (the first GPU if there is one)
        results = self.model.predict(pictures, imgsz=self.imgsz, conf=self.conf, iou=self.iou,
                                     max_det=self.max_boxes, device=self.device, verbose=False)
        names = self.model.names
        out = []
        for picture, result in zip(pictures, results):
            found = result.boxes
            labels = [str(names[int(c)]) for c in found.cls.tolist()]
            out.append(boxes_from_arrays(found.xyxy.cpu().numpy(), found.conf.cpu().numpy(), labels,
                                         picture.size, self.max_boxes))
        return out


def _resolve_yolo_weights(weights: str) -> str:
    """A local weights file for ``weights``: a path, or an ultralytics model name (downloaded once)."""
    path = Path(weights).expanduser()
    if path.is_file():
        return str(path)
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, attempt_download_asset

    is_model_name = path.name == weights and weights in GITHUB_ASSETS_NAMES
    if not is_model_name:
        raise ModelLoadError(
            f"YOLO weights '{weights}' not found: pass an existing .pt, .onnx or .tflite file, or an "
            f"ultralytics model name such as {YOLO_DEFAULT_WEIGHTS}, which ultralytics downloads on "
            "first use (needs internet once)"
        )
    for folder in (Path(SETTINGS["weights_dir"]), _weights_cache()):
        if (folder / weights).is_file():
            return str(folder / weights)
    target = _weights_cache() / weights
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return str(attempt_download_asset(target))
    except Exception as exc:
        raise ModelLoadError(
            f"YOLO weights '{weights}' are not on this machine and could not be downloaded "
            f"({_first_line(exc).lstrip('❌ ')}). ultralytics downloads them on first use when the "
            f"machine is online (into {target.parent}); or download {weights} from "
            "https://github.com/ultralytics/assets/releases yourself and pass the file's path"
        ) from exc


@register_detector("yolo")
def _yolo_factory(weights: str | None = None, **options: Any) -> YoloDetector:
    return YoloDetector(weights, **options)


# -- RetinaNet (torchvision) -------------------------------------------------------------------------
RETINANET_PRETRAINED = ("COCO_V1", "DEFAULT")
_RETINANET_ANCHORS = 9  # anchors per location of torchvision's RetinaNet head (3 scales x 3 ratios)


class RetinaNetDetector(BaseDetector):
    """torchvision's ``retinanet_resnet50_fpn_v2`` (COCO weights, a local state dict, or random).

    ``imgsz`` None keeps torchvision's resizing (shorter side 800, longer at most 1333).
    """

    name = "retinanet"

    def __init__(self, weights: str | None = None, **options: Any):
        import torch
        from torchvision.models.detection import RetinaNet_ResNet50_FPN_V2_Weights, retinanet_resnet50_fpn_v2

        super().__init__(**options)
        settings: dict[str, Any] = {
            "score_thresh": self.conf, "nms_thresh": self.iou, "detections_per_img": self.max_boxes,
        }
        if self.imgsz:
            settings.update(min_size=self.imgsz, max_size=self.imgsz)  # the longer side becomes imgsz
        coco = RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1
        self.weights = weights or "COCO_V1"
        self.labels: list[str] = list(coco.meta["categories"])
        if self.weights in RETINANET_PRETRAINED:
            try:
                pretrained = RetinaNet_ResNet50_FPN_V2_Weights[self.weights]
                model = retinanet_resnet50_fpn_v2(weights=pretrained, **settings)
            except Exception as exc:  # URLError offline, a damaged download, ...
                raise ModelLoadError(
                    f"cannot load RetinaNet {self.weights} weights ({_first_line(exc)}). torchvision "
                    f"downloads them on first use when the machine is online, from {coco.url} into "
                    f"{_weights_cache()}; or pass a local state dict file as the weights"
                ) from exc
        elif self.weights == "random":
            model = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91, **settings)
        else:
            state = _load_state_dict(self.weights)
            classes = _retinanet_classes(state, self.weights)
            if classes != len(self.labels):
                self.labels = [f"class {i}" for i in range(classes)]
            model = retinanet_resnet50_fpn_v2(
                weights=None, weights_backbone=None, num_classes=classes, **settings
            )
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise ModelLoadError(
                    f"'{self.weights}' is not a retinanet_resnet50_fpn_v2 state dict: {_first_line(exc)}"
                ) from exc
        self.torch_device = torch.device(self.device or _default_device())
        self.model = model.eval().to(self.torch_device)

    def _detect(self, pictures: list[Image.Image]) -> list[list[Box]]:
        import torch
        from torchvision.transforms.functional import pil_to_tensor

        tensors = [pil_to_tensor(p).to(self.torch_device, torch.float32).div_(255) for p in pictures]
        with torch.inference_mode():
            outputs = self.model(tensors)  # boxes come back in each input image's own pixels
        out = []
        for picture, output in zip(pictures, outputs):
            labels = [self.labels[i] for i in output["labels"].tolist()]
            keep = [i for i, label in enumerate(labels) if label not in ("__background__", "N/A")]
            out.append(boxes_from_arrays(
                output["boxes"][keep].cpu().numpy(), output["scores"][keep].cpu().numpy(),
                [labels[i] for i in keep], picture.size, self.max_boxes,
            ))
        return out


def _load_state_dict(weights: str) -> dict[str, Any]:
    import torch

    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"RetinaNet weights '{weights}' not found: pass a state dict file (.pth, .pt or .safetensors), "
            f"or leave the weights unset for torchvision's COCO weights (downloaded on first use)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read RetinaNet weights '{weights}': {_first_line(exc)}") from exc
    for key in ("model", "state_dict"):  # training checkpoints often wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelLoadError(f"'{weights}' does not hold a state dict (found {type(state).__name__})")
    return state


def _retinanet_classes(state: dict[str, Any], weights: str) -> int:
    key = "head.classification_head.cls_logits.weight"
    if key not in state:
        raise ModelLoadError(f"'{weights}' is not a retinanet_resnet50_fpn_v2 state dict (no '{key}')")
    return int(state[key].shape[0]) // _RETINANET_ANCHORS


@register_detector("retinanet")
def _retinanet_factory(weights: str | None = None, **options: Any) -> RetinaNetDetector:
    return RetinaNetDetector(weights, **options)
