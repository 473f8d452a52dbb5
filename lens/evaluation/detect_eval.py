"""Check a detector against COCO-format annotations: mAP (pycocotools) and the main-subject rule.

    >>> from lens.detect import create_detector
    >>> detector = create_detector("yolo", "yolov8n_int8.tflite", conf=0.001, max_boxes=300)
    >>> found = detect_coco(detector, "coco-mini/images", "coco-mini/instances_val2017.json")
    >>> coco_map(found)["map50"]
    >>> main_subject_agreement(found)

**Main-subject agreement.** COCO has no "main subject" label, so the rule is checked against what
a person would accept as one: the chosen box must be a real, prominent object, i.e. overlap
(IoU >= 0.5) an annotated object *of the same class* among the three largest annotated objects of
the image. Images without annotations are left out; an image where nothing is detected counts as a
miss. The same is reported for two simpler rules (highest score, largest box) for comparison.

pycocotools is a test / evaluation dependency (requirements-dev.txt), imported only here.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens.detect import Box, Detector, main_subject

#: The detector's default score threshold and box count, applied to low-threshold detections to get
#: what a user sees (greedy NMS keeps the same boxes above a threshold whatever lower boxes exist).
USER_CONF = 0.25
USER_MAX_BOXES = 20


@dataclass
class CocoDetections:
    """Detections of every image of a COCO annotations file, and the annotations themselves."""

    annotations: dict[str, Any]  #: the parsed COCO JSON
    boxes: dict[int, list[Box]]  #: image id -> detected boxes, best first

    def ground_truth(self, image_id: int) -> list[Box]:
        """The image's annotated (non-crowd) objects as boxes with score 1."""
        names = {c["id"]: c["name"] for c in self.annotations["categories"]}
        found = []
        for ann in self.annotations["annotations"]:
            if ann["image_id"] == image_id and not ann.get("iscrowd"):
                x, y, w, h = ann["bbox"]
                found.append(Box(x, y, x + w, y + h, names[ann["category_id"]], 1.0))
        return found


def detect_coco(
    detector: Detector, images_dir: str | os.PathLike, annotations: str | os.PathLike, batch_size: int = 8
) -> CocoDetections:
    """Run ``detector`` on every image listed in the COCO ``annotations`` file, ``batch_size`` at a time.

    Raises ``OSError`` / ``ValueError`` for an unreadable annotations file and
    :class:`~lens.images.ImageError` for an image that cannot be decoded.
    """
    data = json.loads(Path(annotations).read_text())
    images = data["images"]
    boxes: dict[int, list[Box]] = {}
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        found = detector.detect_many([Path(images_dir) / image["file_name"] for image in chunk])
        boxes.update({image["id"]: result for image, result in zip(chunk, found)})
    return CocoDetections(data, boxes)


def coco_map(found: CocoDetections) -> dict[str, float]:
    """COCO box mAP@0.5:0.95 (``map``) and mAP@0.5 (``map50``); labels are matched to categories by name."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    category = {c["name"]: c["id"] for c in found.annotations["categories"]}
    results = [
        {"image_id": image_id, "category_id": category[b.label], "score": b.score,
         "bbox": [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1]}
        for image_id, boxes in found.boxes.items() for b in boxes if b.label in category
    ]
    if not results:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        truth = COCO()
        truth.dataset = found.annotations
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"map": float(evaluation.stats[0]), "map50": float(evaluation.stats[1])}


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (pixels), in [0, 1]; 0 when the union has no area."""
    width = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    height = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = width * height
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


Rule = Callable[[Sequence[Box], tuple[int, int]], "Box | None"]

RULES: dict[str, Rule] = {
    "main_subject": main_subject,
    "highest score": lambda boxes, size: max(boxes, key=lambda b: b.score, default=None),
    "largest box": lambda boxes, size: max(boxes, key=lambda b: b.area, default=None),
}


def main_subject_agreement(found: CocoDetections, rule: Rule = main_subject, top: int = 3) -> float:
    """Share of annotated images whose chosen box is one of the ``top`` largest objects (see module doc)."""
    hits = total = 0
    for image in found.annotations["images"]:
        truth = sorted(found.ground_truth(image["id"]), key=lambda b: -b.area)[:top]
        if not truth:
            continue
        total += 1
        shown = [b for b in found.boxes[image["id"]] if b.score >= USER_CONF][:USER_MAX_BOXES]
        pick = rule(shown, (image["width"], image["height"]))
        hits += pick is not None and any(iou(pick, t) >= 0.5 and pick.label == t.label for t in truth)
    return hits / total if total else math.nan
