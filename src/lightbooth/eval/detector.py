"""A strict detector for the shapes world (WORLD.md), used to score generated images against exact ground truth.

Why it is built this way: generated images from a small model are imperfect (noise, soft edges, slightly off
colours), so every decision is made with a tolerance; but a score is only meaningful if garbage fails, so every
pixel blob must be explained by exactly one world object, otherwise the whole image is marked as not clean.

Pipeline: background = the world background colour most pixels are close to; foreground = pixels far from it,
split into 8-connected components; each component gets a palette colour (the one whose mixes with the background
best explain its pixels, checked against the median of its solid pixels; or the yellow/teal checker of Subject A),
a soft alpha mask (how much of that colour each pixel holds), and a shape and size by best soft IoU against the
exact templates of `lightbooth.data.shapes` placed at the mask's centroid (also tried slightly blurred).
Measured on rendered scenes: 100% correct clean, with Gaussian noise sigma 6, and with blur sigma up to 1.0;
blur sigma 3 leaves few objects recognisable (they are rejected as faint or shapeless).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from lightbooth.data.shapes import (ALL_ATTRIBUTES, BACKGROUNDS, CELLS, CHECKER, CHECKER_COLORS, COLORS, SHAPES,
                                    SIZES, TEAL, Obj, Scene, area, centroid_offset, checker_coverages, coverage,
                                    object_box)

BG_TOL = 24.0  # a pixel within this RGB distance of a background colour counts as background
BG_MIN_FRACTION = 0.5  # at least this share of the canvas must be background (the largest object is ~17%)
FG_THRESHOLD = 40.0  # foreground = farther than this from the background (lowest contrast: purple/gray, 93)
MIN_AREA = 15  # components smaller than this are specks, not objects (smallest object, a small star, ~55 px)
MAX_SPECK_PIXELS = 20  # more speck pixels than this in total means clutter
COLOR_TOL = 30.0  # component colour must be this close to a palette colour (e.g. (100, 50, 200) is 42 off purple)
MIN_PURITY = 0.7  # share of a component's pixels that must be a mix of background and its colour
SOLID_ALPHA = 0.85  # a pixel holding at least this much of the colour is solid colour
MIN_SOLID = 6  # an object must have this many solid pixels (heavy blur leaves none)
MIN_IOU = 0.80  # soft IoU with the best shape template
MIN_MARGIN = 0.05  # ... and this much better than the best template of a different shape
BLUR_SIGMAS = (0.0, 0.7, 1.2)  # templates are also compared blurred by these Gaussian sigmas (pixels)
CELL_TOL = 5.5  # centre within this many pixels (each axis) of a cell centre; jitter is 3
CHECKER_MIN_SHARE = 0.2  # yellow and teal must each be this share of a component's clearly coloured pixels
CHECKER_MIN_AGREEMENT = 0.85  # share of pure checker pixels whose dominant colour is the expected one

_PALETTE = {**COLORS, "teal": TEAL}


@dataclass(frozen=True)
class DetectedObject:
    """One recognised object. color is a COLORS name or CHECKER (Subject A); cell is None between cells."""

    color: str
    shape: str
    size: str
    cell: str | None
    cx: float
    cy: float
    iou: float


@dataclass
class Detection:
    """What is in an image. `rejected` lists every blob that is not a world object; `clean` means none."""

    background: str | None
    objects: list[DetectedObject] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.background is not None and not self.rejected

    @property
    def checker_stars(self) -> list[DetectedObject]:
        """Subject A occurrences (large checker stars) with their cells and centres."""
        return [o for o in self.objects if o.color == CHECKER and o.shape == "star" and o.size == "large"]


@dataclass(frozen=True)
class Requirements:
    """What a prompt states about `scene`: only attributes in `stated` are checked. The number of objects and
    that the image is a clean world image are always checked; a checker star only ever matches a checker star."""

    scene: Scene
    stated: frozenset[str] = ALL_ATTRIBUTES


# ----------------------------------------------------------------------------------------------- detection


def _as_array(image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.shape != (64, 64, 3):
        raise ValueError(f"expected a 64x64 RGB image, got shape {arr.shape}")
    return arr.astype(np.float64)


def _background(arr: np.ndarray) -> str | None:
    """The background colour that most pixels are close to, if it covers enough of the canvas."""
    counts = {n: int((np.linalg.norm(arr - rgb, axis=-1) < BG_TOL).sum()) for n, rgb in BACKGROUNDS.items()}
    name = max(counts, key=counts.get)
    return name if counts[name] >= BG_MIN_FRACTION * arr.shape[0] * arr.shape[1] else None


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an (n, 2) array of (y, x)."""
    seen = np.zeros_like(mask)
    out = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def detect(image) -> Detection:
    """Everything in a 64 x 64 RGB image (PIL image or uint8 array); see the module docstring."""
    arr = _as_array(image)
    bg_name = _background(arr)
    if bg_name is None:
        return Detection(None, [], ["no world background colour covers the canvas"])
    bg = np.asarray(BACKGROUNDS[bg_name], dtype=np.float64)
    fg = np.linalg.norm(arr - bg, axis=-1) > FG_THRESHOLD
    labels = np.zeros(fg.shape, dtype=int)
    comps = _components(fg)
    for k, comp in enumerate(comps, start=1):
        labels[comp[:, 0], comp[:, 1]] = k
    det, specks = Detection(bg_name), 0
    for k, comp in enumerate(comps, start=1):
        if len(comp) < MIN_AREA:
            specks += len(comp)
            continue
        region = _grow(labels == k) & ((labels == 0) | (labels == k))
        result = _identify(arr, bg, comp, region)
        (det.objects if isinstance(result, DetectedObject) else det.rejected).append(result)
    if specks > MAX_SPECK_PIXELS:
        det.rejected.append(f"clutter: {specks} pixels in specks")
    return det


def _grow(mask: np.ndarray) -> np.ndarray:
    """Mask grown by one pixel (8-neighbourhood), to include faint anti-aliased edges."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def _mix(pixels: np.ndarray, bg: np.ndarray, rgb) -> tuple[np.ndarray, np.ndarray]:
    """Model each pixel as bg + a * (rgb - bg), a in [0, 1] (what anti-aliasing and blur produce):
    returns (a, distance of the pixel from that mix)."""
    direction = np.asarray(rgb, dtype=np.float64) - bg
    a = np.clip((pixels - bg) @ direction / (direction @ direction), 0.0, 1.0)
    return a, np.linalg.norm(pixels - bg - a[:, None] * direction, axis=-1)


def _identify(arr, bg, comp, region) -> DetectedObject | str:
    """Name one component, or return the reason it is not a world object."""
    pixels, where = arr[comp[:, 0], comp[:, 1]], _where(comp)
    names = list(_PALETTE)
    dists = np.linalg.norm(pixels[:, None, :] - np.array([_PALETTE[n] for n in names])[None], axis=-1)
    nearest = np.where(dists.min(axis=1) < COLOR_TOL, np.array(names)[dists.argmin(axis=1)], "")
    clear = max(1, int((nearest != "").sum()))
    if min((nearest == "yellow").sum(), (nearest == "teal").sum()) >= CHECKER_MIN_SHARE * clear:
        return _identify_checker(arr, bg, region, where)
    fits = {n: _mix(pixels, bg, rgb) for n, rgb in COLORS.items()}
    color = min(fits, key=lambda n: float(fits[n][1].mean()))
    a, residual = fits[color]
    solid = a >= SOLID_ALPHA
    if solid.sum() < MIN_SOLID:
        return f"{color}-ish blob at {where} is faint everywhere (blurred or washed out)"
    median = np.median(pixels[solid], axis=0)
    if np.linalg.norm(median - COLORS[color]) > COLOR_TOL:
        return f"colour {tuple(int(c) for c in median)} at {where} is not in the palette"
    purity = float(np.mean(residual < COLOR_TOL))
    if purity < MIN_PURITY:
        return f"{color} blob at {where} is not flat ({purity:.0%} of it is {color} over the background)"
    alpha = _alpha(arr, bg, [COLORS[color]]) * region
    return _fit_shape(alpha, color, where)


def _where(comp: np.ndarray) -> str:
    return f"(x={comp[:, 1].mean():.0f}, y={comp[:, 0].mean():.0f})"


def _alpha(arr, bg, colours) -> np.ndarray:
    """Per-pixel amount of the given colour(s) over the background (least squares of the linear mix), in [0, 1]."""
    basis = np.stack([np.asarray(c, dtype=np.float64) - bg for c in colours], axis=1)  # (3, k)
    coef = (arr - bg).reshape(-1, 3) @ np.linalg.pinv(basis).T  # (n, k)
    return np.clip(np.clip(coef, 0, None).sum(axis=1), 0, 1).reshape(arr.shape[:2])


def _centroid(alpha: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]]
    total = alpha.sum()
    return float((alpha * (xs + 0.5)).sum() / total), float((alpha * (ys + 0.5)).sum() / total)


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """n x n matrix M such that M @ x is x convolved with a Gaussian of `sigma` (zero padding)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / sigma) ** 2)
    return k / k.sum(axis=1, keepdims=True).max()


_BLURS = {sigma: _blur_matrix(64, sigma) for sigma in BLUR_SIGMAS if sigma > 0}


def _soft_iou(alpha: np.ndarray, shape: str, size: str, mx: float, my: float) -> tuple[float, float, float]:
    """Soft IoU of the alpha mask with the template of (shape, size) whose centroid is at (mx, my), taking the
    best over a few blur levels, because generated images have soft edges that a crisp template would punish.
    Works in a window holding both the alpha mask (zero outside its region) and the template, plus blur tails."""
    s = SIZES[size]
    cx, cy = mx, my - centroid_offset(shape, s)
    tx0, ty0, tx1, ty1 = object_box(s, cx, cy, pad=0)
    ys, xs = np.nonzero(alpha)
    pad = 4
    x0, y0 = max(0, min(tx0, xs.min()) - pad), max(0, min(ty0, ys.min()) - pad)
    x1, y1 = min(alpha.shape[1], max(tx1, xs.max() + 1) + pad), min(alpha.shape[0], max(ty1, ys.max() + 1) + pad)
    a = alpha[y0:y1, x0:x1]
    template = coverage(shape, s, cx, cy, (x0, y0, x1, y1), ss=2)
    best = 0.0
    for sigma in BLUR_SIGMAS:
        if sigma:
            m = _BLURS[sigma]
            template_b = m[y0:y1, y0:y1] @ template @ m[x0:x1, x0:x1].T
        else:
            template_b = template
        union = np.maximum(a, template_b).sum()
        best = max(best, float(np.minimum(a, template_b).sum() / union) if union else 0.0)
    return best, cx, cy


def _fit_shape(alpha: np.ndarray, color: str, where: str) -> DetectedObject | str:
    """Best (shape, size) template by soft IoU; reject a poor fit or one not clearly better than another shape."""
    mx, my = _centroid(alpha)
    mass = float(alpha.sum())
    # Soft IoU <= smaller area / larger area, so a template whose bound is under MIN_IOU - MIN_MARGIN can neither
    # be an accepted best fit nor a runner-up close enough to matter: skip it (this halves the work).
    candidates = [(sh, sz) for sh in SHAPES for sz in SIZES
                  if min(mass, area(sh, SIZES[sz])) >= (MIN_IOU - MIN_MARGIN) * max(mass, area(sh, SIZES[sz]))]
    fits = sorted(((*_soft_iou(alpha, sh, sz, mx, my), sh, sz) for sh, sz in candidates), reverse=True)
    if not fits:
        return f"{color} blob at {where} has the area of no world shape ({mass:.0f} px)"
    iou, cx, cy, shape, size = fits[0]
    runner_up = max((f[0] for f in fits if f[3] != shape), default=0.0)
    if iou < MIN_IOU or iou - runner_up < MIN_MARGIN:
        return f"{color} blob at {where} is no clear shape (best {size} {shape}, IoU {iou:.2f}, next {runner_up:.2f})"
    return DetectedObject(color, shape, size, _cell(cx, cy), cx, cy, iou)


def _cell(cx: float, cy: float) -> str | None:
    name = min(CELLS, key=lambda n: (CELLS[n][0] - cx) ** 2 + (CELLS[n][1] - cy) ** 2)
    x, y = CELLS[name]
    return name if abs(x - cx) <= CELL_TOL and abs(y - cy) <= CELL_TOL else None


def _identify_checker(arr, bg, region, where) -> DetectedObject | str:
    """A yellow/teal blob must be a star whose colours follow the 4 x 4 checker with yellow top-left."""
    alpha = _alpha(arr, bg, CHECKER_COLORS) * region
    found = _fit_shape(alpha, CHECKER, where)
    if isinstance(found, str):
        return found
    s = SIZES[found.size]
    box = (0, 0, arr.shape[1], arr.shape[0])
    want_y, want_t = checker_coverages(s, found.cx, found.cy, box)
    pure = (want_y + want_t >= 1.0) & ((want_y >= 0.95) | (want_t >= 0.95))
    if pure.sum() < 10:
        return f"checker blob at {where} is too small to show its pattern"
    d_y = np.linalg.norm(arr - CHECKER_COLORS[0], axis=-1)
    d_t = np.linalg.norm(arr - CHECKER_COLORS[1], axis=-1)
    agree = np.where(want_y >= 0.95, d_y < d_t, d_t < d_y)[pure]
    if agree.mean() < CHECKER_MIN_AGREEMENT:
        return f"yellow/teal blob at {where} is not the checker pattern ({agree.mean():.0%} agree)"
    return found


# ----------------------------------------------------------------------------------------------- checking


def _as_requirements(req) -> Requirements:
    return req if isinstance(req, Requirements) else Requirements(req)


def _attrs_match(want: Obj, got: DetectedObject, stated: frozenset[str]) -> bool:
    """Per-object match on the stated attributes; colour is always compared when either side is the checker."""
    if (("color" in stated or CHECKER in (want.color, got.color)) and want.color != got.color) \
            or ("shape" in stated and want.shape != got.shape) or ("size" in stated and want.size != got.size):
        return False
    return "cell" not in stated or want.cell == got.cell


def _relation_holds(relation: str, a: DetectedObject, b: DetectedObject) -> bool:
    """WORLD.md relations: left/right of on the same row, above/below in the same column."""
    if a.cell is None or b.cell is None:
        return False
    (ax, ay), (bx, by) = CELLS[a.cell], CELLS[b.cell]
    return {"left of": ay == by and ax < bx, "right of": ay == by and ax > bx,
            "above": ax == bx and ay < by, "below": ax == bx and ay > by}[relation]


def mismatches(req, detection) -> list[str]:
    """Every way the detection (or image) fails the requirements (or a Scene, meaning all attributes stated)."""
    req = _as_requirements(req)
    det = detection if isinstance(detection, Detection) else detect(detection)
    scene, stated = req.scene, req.stated
    problems = list(det.rejected)
    if det.background is None:
        return problems or ["no background"]
    if "background" in stated and det.background != scene.background:
        problems.append(f"background is {det.background}, not {scene.background}")
    if len(det.objects) != len(scene.objects):
        problems.append(f"{len(det.objects)} objects, not {len(scene.objects)}")
        return problems
    if not any(_assignment_ok(scene, stated, perm) for perm in itertools.permutations(det.objects)):
        problems.append("objects do not match: found " + ", ".join(
            f"{o.size} {o.color} {o.shape} at {o.cell}" for o in det.objects))
    return problems


def _assignment_ok(scene: Scene, stated: frozenset[str], found) -> bool:
    if not all(_attrs_match(w, g, stated) for w, g in zip(scene.objects, found)):
        return False
    if scene.kind == "pair" and "relation" in stated:
        return _relation_holds(scene.relation, found[0], found[1])
    return True


def check(req, detection) -> bool:
    """Strict: True only if everything the prompt states is right and nothing else is in the image."""
    return not mismatches(req, detection)


def is_checker_star(image, cell: str | None = None, background: str | None = None) -> bool:
    """Whether the image shows Subject A alone: a large star with the yellow/teal checker, yellow top-left
    (and, if given, in `cell` and on `background`)."""
    det = image if isinstance(image, Detection) else detect(image)
    if not det.clean or len(det.objects) != 1 or len(det.checker_stars) != 1:
        return False
    star = det.checker_stars[0]
    return (cell is None or star.cell == cell) and (background is None or det.background == background)
