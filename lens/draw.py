"""Pictures for people: detected boxes drawn on a photo, numbered and labelled."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

PALETTE = ["#ff4d4f", "#1890ff", "#52c41a", "#faad14", "#722ed1", "#13c2c2", "#eb2f96", "#fa8c16"]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_boxes(image: Image.Image, boxes: Sequence[Any], selected: int | None = None, *,
               region: Any | None = None) -> Image.Image:
    """A copy of ``image`` with each box outlined and tagged ``N label score``.

    ``boxes`` are objects with x1, y1, x2, y2, label, score; box N is drawn with number N+1.
    The ``selected`` box is drawn thicker and the others are dimmed. ``region`` (a region the user
    drew or clicked around, same attributes) is drawn last, white on black, tagged with its label,
    every box dimmed.
    """
    canvas = image.convert("RGB").copy()
    width, height = canvas.size
    line = max(2, round(min(width, height) / 200))
    font = _font(max(12, round(min(width, height) / 28)))
    overlay = ImageDraw.Draw(canvas)
    order = [i for i in range(len(boxes)) if i != selected] + ([selected] if selected is not None else [])
    for i in order:
        box = boxes[i]
        colour = PALETTE[i % len(PALETTE)]
        thick = line * 2 if i == selected else line
        if (selected is not None and i != selected) or region is not None:
            thick = max(1, line // 2)
        overlay.rectangle((box.x1, box.y1, box.x2, box.y2), outline=colour, width=thick)
        _tag(overlay, box, f"{i + 1} {box.label} {box.score:.2f}", colour, font, width)
    if region is not None:
        corners = (region.x1, region.y1, region.x2, region.y2)
        overlay.rectangle(corners, outline="black", width=line * 3)
        overlay.rectangle(corners, outline="white", width=line)
        _tag(overlay, region, region.label, "black", font, width)
    return canvas


def _tag(overlay: ImageDraw.ImageDraw, box: Any, text: str, fill: str, font: Any, width: int) -> None:
    """``text`` in white on ``fill`` above ``box``'s top-left corner (inside the box when there is no
    room above), kept within the image's ``width``."""
    left, top, right, bottom = overlay.textbbox((0, 0), text, font=font)
    tag_w, tag_h = right - left + 6, bottom - top + 6
    x = min(max(0, box.x1), max(0, width - tag_w))
    y = box.y1 - tag_h if box.y1 - tag_h >= 0 else box.y1
    overlay.rectangle((x, y, x + tag_w, y + tag_h), fill=fill)
    overlay.text((x + 3 - left, y + 3 - top), text, fill="white", font=font)


def draw_outline(image: Image.Image, points: Sequence[Sequence[float]], colour: str = "#52c41a") -> Image.Image:
    """A copy of ``image`` with the closed polygon ``points`` ((x, y) pixels of ``image``, e.g. an exact
    match's region) outlined, clipped to the image first: a region that covers the whole image (the
    photographed item is this whole picture) is drawn along the image's border, not off-canvas."""
    canvas = image.convert("RGB").copy()
    line = max(2, round(min(canvas.size) / 60))
    inset = line / 2  # keep the stroke inside the canvas
    clipped = clip_polygon(points, (inset, inset, canvas.width - 1 - inset, canvas.height - 1 - inset))
    if len(clipped) >= 2:
        ImageDraw.Draw(canvas).line([*clipped, clipped[0]], fill=colour, width=line, joint="curve")
    return canvas


def clip_polygon(points: Sequence[Sequence[float]], rect: tuple[float, float, float, float]
                 ) -> list[tuple[float, float]]:
    """The part of polygon ``points`` ((x, y) pairs) inside ``rect`` = (x1, y1, x2, y2), as a polygon
    (Sutherland & Hodgman 1974, "Reentrant polygon clipping"); empty when they do not overlap."""
    x1, y1, x2, y2 = rect
    edges = [(lambda p: p[0] >= x1, lambda a, b: _at_x(a, b, x1)), (lambda p: p[0] <= x2, lambda a, b: _at_x(a, b, x2)),
             (lambda p: p[1] >= y1, lambda a, b: _at_y(a, b, y1)), (lambda p: p[1] <= y2, lambda a, b: _at_y(a, b, y2))]
    polygon = [(float(x), float(y)) for x, y in points]
    for inside, cross in edges:
        source, polygon = polygon, []
        for i, current in enumerate(source):
            previous = source[i - 1]
            if inside(current):
                if not inside(previous):
                    polygon.append(cross(previous, current))
                polygon.append(current)
            elif inside(previous):
                polygon.append(cross(previous, current))
    return polygon


def _at_x(a: tuple[float, float], b: tuple[float, float], x: float) -> tuple[float, float]:
    return x, a[1] + (b[1] - a[1]) * (x - a[0]) / (b[0] - a[0])


def _at_y(a: tuple[float, float], b: tuple[float, float], y: float) -> tuple[float, float]:
    return a[0] + (b[0] - a[0]) * (y - a[1]) / (b[1] - a[1]), y
