"""Instance images (formats, EXIF, alpha, sizes, duplicates, bombs, buckets, captions) and the class image cache."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lightbooth.data.class_images import MANIFEST, class_settings, ensure_class_images
from lightbooth.data.instance import bucket_sizes, fit_to, load_instance_images, nearest_bucket, open_image
from lightbooth.errors import LightboothError


def fake_png_header(path, width, height):
    """A PNG whose header claims width x height: PIL's bomb check runs on the header alone."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))


def test_exif_orientation_and_alpha_are_applied(tmp_path):
    im = Image.new("RGB", (80, 64), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a portrait photo stored as landscape
    im.save(tmp_path / "a.jpg", exif=exif.tobytes())
    assert open_image(tmp_path / "a.jpg").size == (64, 80)
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "b.png")
    flat = np.asarray(open_image(tmp_path / "b.png"))
    assert flat.shape == (64, 64, 3) and tuple(flat[1, 1]) == (255, 255, 255) and tuple(flat[0, 0]) == (0, 0, 255)


def test_folder_loading_captions_formats_and_duplicates(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i, fmt in enumerate(["png", "jpg", "webp"]):
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(tmp_path / f"{i}.{fmt}")
    (tmp_path / "3.png").write_bytes((tmp_path / "0.png").read_bytes())
    (tmp_path / "0.txt").write_text("a {token} star on a black background\n")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"garbage")
    images = load_instance_images(tmp_path)
    assert [im.path.name for im in images] == ["0.png", "1.jpg", "2.webp", "3.png"]
    assert images[0].caption == "a {token} star on a black background" and images[1].caption is None
    err = capsys.readouterr().err
    assert "3.png is a duplicate of 0.png" in err and "broken.png" in err


@pytest.mark.parametrize("setup,needle", [
    (lambda d: None, "has no images"),
    (lambda d: [Image.new("RGB", (64, 64), (i, 0, 0)).save(d / f"{i}.png") for i in range(2)], "2 usable image"),
    (lambda d: [Image.new("RGB", (64 if i else 40, 64), (i, 0, 0)).save(d / f"{i}.png") for i in range(4)],
     "0.png (40x64)"),
    (lambda d: fake_png_header(d / "bomb.png", 30000, 30000), "decompression bomb"),
])
def test_bad_instance_folders(tmp_path, setup, needle):
    setup(tmp_path)
    with pytest.raises(LightboothError, match=None) as e:
        load_instance_images(tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_buckets_cover_aspect_ratios_at_about_the_same_area():
    buckets = bucket_sizes(512, 64)
    assert (512, 512) in buckets and all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(0.75 < w * h / 512**2 < 1.25 and max(w, h) / min(w, h) <= 2 for w, h in buckets)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    wide = nearest_bucket((1600, 900), buckets)
    assert wide[0] > wide[1] and fit_to(Image.new("RGB", (1600, 900)), wide).size == wide


def test_class_images_are_reused_and_topped_up_never_regenerated(tmp_path):
    calls = []

    class FakeGen:  # stands in for a Generator: the cache logic is what is under test here
        def __call__(self, prompt, seed, num_images, **settings):
            calls.append(list(seed))
            return [Image.new("RGB", (64, 64), (s, 0, 0)) for s in seed]

    settings = class_settings("m", "a star", "base", 20, 4.0, 64, 64)
    first = ensure_class_images(tmp_path, settings, 3, 10, FakeGen)
    assert len(first) == 3 and calls == [[10, 11, 12]]
    mtimes = {p: p.stat().st_mtime_ns for p in first}
    assert ensure_class_images(tmp_path, settings, 2, 10, FakeGen) == first[:2] and len(calls) == 1
    more = ensure_class_images(tmp_path, settings, 5, 10, FakeGen)
    assert len(more) == 5 and calls[1] == [13, 14]
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert sorted(json.loads((tmp_path / MANIFEST).read_text())["files"].values()) == [10, 11, 12, 13, 14]
    other = class_settings("m", "a dog", "base", 20, 4.0, 64, 64)
    with pytest.raises(LightboothError, match="another prompt"):
        ensure_class_images(tmp_path, other, 5, 10, FakeGen)
