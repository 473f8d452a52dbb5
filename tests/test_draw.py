"""Drawing on pictures: boxes and exact matches' outlines."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lens.draw import clip_polygon, draw_outline


def test_an_outline_larger_than_the_picture_is_drawn_along_its_border():
    """An exact match whose region covers the whole result image (the photographed item is this whole
    picture) must still show: the polygon is clipped to the image, not drawn off-canvas."""
    region = [[16, -53], [354, 40], [376, 442], [-69, 179]]  # seen on lens-task query 0005, 224x224 result
    clipped = clip_polygon(region, (0, 0, 223, 223))
    assert all(0 <= x <= 223 and 0 <= y <= 223 for x, y in clipped) and len(clipped) >= 4
    drawn = np.asarray(draw_outline(Image.new("RGB", (224, 224), "white"), region))
    green = (drawn[..., 1] > 150) & (drawn[..., 0] < 150)
    assert green[:, :6].sum() > 100 and green[-6:, :].sum() > 100  # left and bottom borders drawn
    assert clip_polygon([[300, 300], [400, 300], [400, 400]], (0, 0, 223, 223)) == []
