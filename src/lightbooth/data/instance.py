"""Instance images for personalization: any format, size and orientation in, clean RGB training images out.

EXIF orientation is applied (phones store portraits as rotated landscapes), transparency is flattened onto white,
tiny and unreadable images are named in one-line errors, exact duplicates are warned about, and each image is
fitted to the aspect-ratio bucket nearest its own shape so nothing important is cropped away.
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import LightboothError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MIN_SIDE = 64  # smaller images hold too little of the subject to teach it
MIN_IMAGES = 3
MAX_ASPECT = 2.0  # buckets span aspect ratios 1:2 to 2:1


@dataclass
class InstanceImage:
    path: Path
    image: Image.Image  # RGB, upright, alpha flattened
    caption: str | None  # text of name.txt next to the image, if any


def open_image(path: Path) -> Image.Image:
    """Open any PIL-readable image upright in RGB; a decompression bomb is an error, not a warning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise LightboothError(f"{path} is too large to decode safely (a decompression bomb?); resize it below "
                              f"{Image.MAX_IMAGE_PIXELS} pixels or remove it") from None
    return flatten_alpha(im)


def flatten_alpha(im: Image.Image) -> Image.Image:
    """RGB; any transparency (RGBA, LA, palette with transparency) composited onto white."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def load_instance_images(folder: str | Path, min_images: int = MIN_IMAGES) -> list[InstanceImage]:
    """Every usable image in `folder` (sorted by name) with its caption; one-line errors for what cannot work."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LightboothError(f"instance folder {folder} does not exist or is not a folder")
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as e:
        raise LightboothError(f"cannot read instance folder {folder}: {e.strerror or e}") from None
    if not files:
        raise LightboothError(f"instance folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                              f"put {min_images} or more photos of the subject in it")
    out, small, seen = [], [], {}
    for path in files:
        try:
            im = open_image(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            print(f"warning: skipping {path.name}: not a readable image ({type(e).__name__})", file=sys.stderr)
            continue
        if min(im.size) < MIN_SIDE:
            small.append(f"{path.name} ({im.size[0]}x{im.size[1]})")
            continue
        digest = hashlib.sha256(im.tobytes() + str(im.size).encode()).hexdigest()
        if digest in seen:
            print(f"warning: {path.name} is a duplicate of {seen[digest]}; it counts twice in training",
                  file=sys.stderr)
        seen.setdefault(digest, path.name)
        caption_file = path.with_suffix(".txt")
        try:
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
        except (OSError, UnicodeDecodeError) as e:
            raise LightboothError(f"cannot read caption {caption_file} ({getattr(e, 'strerror', None) or e.reason}); "
                                  "save it as UTF-8 text or remove it") from None
        out.append(InstanceImage(path, im, caption or None))
    if small:
        raise LightboothError(f"images under {MIN_SIDE} px on a side in {folder}: {', '.join(small)}; "
                              "use larger images or remove them")
    if len(out) < min_images:
        raise LightboothError(f"instance folder {folder} has {len(out)} usable image(s); DreamBooth needs at least "
                              f"{min_images} images of the subject")
    return out


def bucket_sizes(resolution: int, factor: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution^2 pixels, sides multiples of `factor`, from 1:max to max:1."""
    out = set()
    side = resolution
    while side <= resolution * max_aspect ** 0.5 + factor:
        other = max(factor, int(round(resolution * resolution / side / factor)) * factor)
        w = max(factor, side // factor * factor)
        if max(w, other) / min(w, other) <= max_aspect + 1e-6:
            out |= {(w, other), (other, w)}
        side += factor
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to `size`'s (in log ratio; ties to the larger area)."""
    r = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


def fit_to(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover `size` and crop the centre (the least a bucket of the same aspect ratio crops)."""
    return ImageOps.fit(im, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))

