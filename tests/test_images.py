"""Every kind of picture decodes to upright 8-bit RGB, or fails with a readable ImageError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from lens.errors import LensError
from lens.images import ImageError, crop, expand_box, iter_image_files, load_image
from lens.types import Box


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = load_image(_encoded(wide, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.size == (20, 40)
    top = np.asarray(image)[2, 10]
    assert top[2] > 200 and top[0] < 80  # the blue stripe is now at the top


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("1", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"),
                                       ("I;16", "PNG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("RGB", "TIFF")])
def test_pixel_modes_and_formats_become_rgb(mode, fmt):
    source = Image.new("RGB", (30, 20), (200, 120, 40)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))
    image = load_image(_encoded(source, fmt))
    assert image.mode == "RGB" and image.size == (30, 20)
    if mode == "I;16":
        assert abs(int(np.asarray(image)[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.paste((0, 255, 0, 255), (0, 0, 5, 10))
    image = np.asarray(load_image(_encoded(rgba, "PNG")))
    assert tuple(image[5, 8]) == (255, 255, 255)
    assert tuple(image[5, 2]) == (0, 255, 0)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert tuple(np.asarray(load_image(_encoded(palette, "PNG", transparency=0)))[0, 0]) == (255, 255, 255)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(data))[0, 0, 0] > 200


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is a text file, not a picture", "not an image"),
])
def test_unreadable_bytes_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_truncated_jpeg_is_an_image_error(tmp_path):
    data = _encoded(Image.new("RGB", (200, 200), (1, 2, 3)), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="cut.jpg.* truncated"):
        load_image(path)


def test_decompression_bomb_is_refused_without_decoding():
    bomb = _encoded(Image.new("1", (20000, 20000)), "PNG")
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(bomb)


def test_missing_file_and_size_limit(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.jpg")
    path = tmp_path / "big.png"
    path.write_bytes(_encoded(Image.new("RGB", (64, 64)), "PNG"))
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path, max_bytes=10)


def test_crop_clamps_to_the_image_and_refuses_empty_boxes():
    image = Image.new("RGB", (100, 50))
    assert crop(image, (-10, -10, 40, 30)).size == (40, 30)
    assert crop(image, None) is image
    with pytest.raises(ImageError, match="no area"):
        crop(image, (10, 10, 10, 40))
    with pytest.raises(ImageError, match="no area"):
        crop(image, (200, 10, 300, 40))
    # a box under a pixel wide, as on a 1x1 upload, keeps the pixel it covers
    assert crop(Image.new("RGB", (1, 1)), (0, 0, 0.5, 1)).size == (1, 1)
    assert crop(image, (20.2, 5, 20.4, 9)).size == (1, 4)



def test_crop_adds_the_margin_and_stays_inside_the_image():
    image = Image.fromarray(np.arange(80 * 100 * 3, dtype=np.uint32).reshape(80, 100, 3).astype(np.uint8))
    box = Box(10, 10, 50, 30, "thing", 0.9)
    assert expand_box(box, image.size, 0.1) == (6.0, 8.0, 54.0, 32.0)  # 10% of 40 x 20 on each side
    region = crop(image, box, margin=0.1)
    assert region.size == (48, 24)
    assert np.array_equal(np.asarray(region), np.asarray(image)[8:32, 6:54])
    assert crop(image, box, margin=0).size == (40, 20)
    edge = crop(image, (80, 60, 100, 80), margin=0.5)  # the margin is clamped at the borders
    assert edge.size == (30, 30)
    assert np.array_equal(np.asarray(edge), np.asarray(image)[50:80, 70:100])
    assert crop(image, None) is image  # the whole image is always an option


@pytest.mark.parametrize("box, why", [
    ((10, 10, 10, 40), "no area"),
    ((30, 10, 20, 40), "no area"),
    ((100, 10, 140, 40), "outside the 100x80 image"),
    ((-50, -50, -1, -1), "outside the 100x80 image"),
])
def test_crop_of_an_empty_or_outside_box_is_a_clear_error(box, why):
    with pytest.raises(ImageError, match=why):
        crop(Image.new("RGB", (100, 80)), box, margin=0.5)


def test_negative_margin_is_refused():
    with pytest.raises(LensError, match="margin"):
        crop(Image.new("RGB", (100, 80)), (10, 10, 50, 50), margin=-0.1)


def test_crop_takes_a_detector_box_or_four_numbers_alike():
    image = Image.fromarray(np.arange(80 * 100 * 3, dtype=np.uint32).reshape(80, 100, 3).astype(np.uint8))
    detected = Box(10, 10, 50, 30, "cup", 0.8)
    assert np.array_equal(np.asarray(crop(image, detected, 0.1)), np.asarray(crop(image, [10, 10, 50, 30], 0.1)))
    with pytest.raises(ImageError, match="4 numbers"):
        crop(image, (1, 2, 3))

def test_folder_scan_is_recursive_sorted_and_skips_hidden(tmp_path):
    for name in ("b.jpg", "a.PNG", "sub/c.webp", ".hidden/d.jpg", "sub/.e.jpg", "notes.txt", "f.gif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)]
    assert found == ["a.PNG", "b.jpg", "f.gif", "sub/c.webp"]


@pytest.mark.shared
def test_shared_odd_formats_decode():
    folder = shared_path("data", "near-duplicates", "formats_images")
    decoded = []
    for path in sorted(folder.iterdir()):
        try:
            image = load_image(path)
        except ImageError as exc:  # marbles.pbm in this fixture set is cut short
            assert "truncated" in str(exc) and path.name in str(exc)
            continue
        assert image.mode == "RGB" and min(image.size) > 1, path.name
        decoded.append(path.suffix)
    assert {".ppm", ".pgm", ".tiff", ".gif"} <= set(decoded)
    alpha = load_image(folder.parent / "alpha_channel_image.png")
    assert alpha.mode == "RGB"


def test_unreadable_bytes_stay_a_clear_error_after_ultralytics_patches_pil():
    """ultralytics replaces PIL.Image.open process-wide (to add HEIF on demand); lens must still
    answer a bad upload with an ImageError, e.g. in the app, which imports ultralytics."""
    import ultralytics  # noqa: F401

    with pytest.raises(ImageError, match="not an image lens can read"):
        load_image(b"this is a text file, not a picture")


def test_large_jpegs_decode_at_a_reduced_scale_when_the_caller_needs_fewer_pixels(tmp_path):
    from conftest import make_picture

    big = make_picture(3, size=(2000, 1500))
    big.save(tmp_path / "big.jpg", quality=92)
    full = load_image(tmp_path / "big.jpg")
    assert full.size == (2000, 1500)
    small = load_image(tmp_path / "big.jpg", min_side=200)
    assert small.size == (500, 375)  # 1/4 scale: 1/8 would leave 187 < 200 pixels
    reference = np.asarray(full.resize(small.size, Image.BOX), dtype=np.float32)
    assert np.abs(np.asarray(small, dtype=np.float32) - reference).mean() < 3  # the same picture
    exif = Image.Exif()
    exif[0x0112] = 6
    big.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rotated.jpg", min_side=200).size == (375, 500)  # still upright
    big.save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", min_side=200).size == (2000, 1500)  # only JPEG scales
    assert load_image(tmp_path / "big.jpg", min_side=800).size == (2000, 1500)  # < 2 x min_side: as is


def test_a_users_region_is_ordered_clamped_and_widened_to_a_usable_size():
    from lens.images import MIN_REGION, fit_region

    # corners in any order (dragged up and left), partly outside: ordered and clamped to the picture
    assert fit_region((120, 90, -30, 10), (100, 80)).xyxy == (0, 10, 100, 80)
    # a click-and-release (no extent) near an edge: widened to MIN_REGION, kept inside
    tiny = fit_region((99, 40, 99, 40), (100, 80))
    assert tiny.xyxy == (100 - MIN_REGION, 40 - MIN_REGION / 2, 100, 40 + MIN_REGION / 2)
    assert tiny.label == "your region" and tiny.score == 1.0
    # a picture smaller than MIN_REGION: the region is the whole side
    assert fit_region((2, 2, 3, 3), (8, 30)).xyxy == (0, 0, 8, MIN_REGION)  # and shifted down inside
    for bad in [(200, 200, 300, 300), (float("nan"), 0, 5, 5)]:
        with pytest.raises(ImageError):
            fit_region(bad, (100, 80))


def test_a_click_outside_every_box_searches_a_square_around_it_inside_the_picture():
    from lens.images import CLICK_REGION, region_around

    middle = region_around(320, 240, (640, 480))
    side = CLICK_REGION * 480
    assert middle.xyxy == pytest.approx((320 - side / 2, 240 - side / 2, 320 + side / 2, 240 + side / 2))
    assert middle.label == "region around (320, 240)"
    corner = region_around(635, 2, (640, 480))  # shifted inside, same size
    assert corner.xyxy == pytest.approx((640 - side, 0, 640, side))
    with pytest.raises(ImageError):
        region_around(700, 2, (640, 480))


def test_the_box_a_user_drew_moved_or_resized_in_the_box_editor_is_found():
    from lens.images import changed_box

    cup, spoon = (100, 100, 300, 250), (310, 90, 400, 300)
    assert changed_box([cup, spoon], [cup, spoon]) is None  # a click: nothing changed
    assert changed_box([cup, spoon], [(20, 30, 20, 30), cup, spoon]) is None  # a box just started
    assert changed_box([cup, spoon], [(-46, 20, 74, 110), cup, spoon]) == (-46, 20, 74, 110)  # drawn, put first
    assert changed_box([cup, spoon], [cup, (310, 90, 420, 330)]) == (310, 90, 420, 330)  # the spoon resized
    assert changed_box([cup, spoon], [(120, 110, 320, 260), spoon]) == (120, 110, 320, 260)  # the cup moved
    assert changed_box([cup, spoon], [spoon]) is None  # the cup removed
    assert changed_box([cup, cup], [cup, (90, 100, 300, 250)]) == (90, 100, 300, 250)  # one of two equal boxes
    assert changed_box([cup], [(100.3, 99.8, 300, 250)]) is None  # within tolerance (the editor rounds)
    assert changed_box([], [(80, 60, 30, 10)]) == (80, 60, 30, 10)  # dragged up and left: fit_region orders it
