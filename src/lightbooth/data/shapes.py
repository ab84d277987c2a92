"""The shapes world, version 1 (see WORLD.md): scenes, exact rendering, bilingual captions, a stream.

Why this exists: the project trains and evaluates its small default model offline, so it needs a data source with
exact ground truth. Everything here is deterministic given a `numpy.random.Generator`, uses numpy + Pillow only,
and does no work at import time beyond building the constant tables.

Geometry is defined once, in `inside()`, on continuous pixel coordinates (pixel (i, j) covers [i, i+1) x [j, j+1),
origin top-left, y down). The renderer and the detector (`lightbooth.eval.detector`) both use it, so "what a shape
is" cannot drift between them. Rendering supersamples 4 x 4 per pixel; a fully covered pixel gets exactly the
palette colour, edge pixels are a linear mix of object and background colour (anti-aliasing).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

CANVAS = 64
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
BACKGROUND_ZH = {"white": "白色", "black": "黑色", "gray": "灰色"}
COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 215, 40), "green": (40, 170, 70),
    "cyan": (30, 200, 210), "blue": (40, 80, 225), "purple": (140, 60, 190), "pink": (240, 120, 190),
}
COLOR_ZH = {"red": "红色", "orange": "橙色", "yellow": "黄色", "green": "绿色", "cyan": "青色", "blue": "蓝色",
            "purple": "紫色", "pink": "粉色"}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SHAPE_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "五角星", "diamond": "菱形",
            "cross": "十字"}
SIZES = {"small": 14, "large": 26}
SIZE_ZH = {"small": "小", "large": "大"}
CELLS = {
    "top left": (16, 16), "top": (32, 16), "top right": (48, 16),
    "left": (16, 32), "center": (32, 32), "right": (48, 32),
    "bottom left": (16, 48), "bottom": (32, 48), "bottom right": (48, 48),
}
CELL_ZH = {"top left": "左上角", "top": "上方", "top right": "右上角", "left": "左边", "center": "中间",
           "right": "右边", "bottom left": "左下角", "bottom": "下方", "bottom right": "右下角"}
CELL_NAMES = tuple(CELLS)  # row-major: index k is row k // 3, column k % 3
JITTER = 3.0
GAP = 3  # objects in one scene keep at least this many clean background pixels between them (see _jitter)
STAR_INNER_RATIO = 0.382
KINDS = ("single", "pair", "count")
RELATIONS = ("left of", "right of", "above", "below")

# Subject A. Its scenes use the pseudo-colour CHECKER; the world's captions never describe it.
SUBJECT_A = "checker star"
CHECKER = "checker"
TEAL = (0, 128, 128)
CHECKER_COLORS = (COLORS["yellow"], TEAL)  # (colour of the top-left checker cell, the other one)

ALL_ATTRIBUTES = frozenset({"background", "color", "shape", "size", "cell", "relation", "count"})


@dataclass(frozen=True)
class Obj:
    """One object: names from the tables above plus its exact centre (cell centre + jitter)."""

    shape: str
    color: str  # a COLORS name, or CHECKER for Subject A
    size: str
    cell: str
    cx: float
    cy: float

    def __post_init__(self):
        if self.shape not in SHAPES or self.size not in SIZES or self.cell not in CELLS:
            raise ValueError(f"bad object {self}")
        if self.color not in COLORS and self.color != CHECKER:
            raise ValueError(f"bad colour {self.color!r}")


@dataclass(frozen=True)
class Scene:
    """A whole image. pair: objects[0] `relation` objects[1]. kind "subject" is Subject A alone."""

    kind: str  # "single" | "pair" | "count" | "subject"
    background: str
    objects: tuple[Obj, ...]
    relation: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS + ("subject",) or self.background not in BACKGROUNDS:
            raise ValueError(f"bad scene kind/background: {self.kind!r}, {self.background!r}")
        if (self.relation is not None) != (self.kind == "pair") or self.relation not in RELATIONS + (None,):
            raise ValueError(f"bad relation {self.relation!r} for a {self.kind} scene")
        object.__setattr__(self, "objects", tuple(self.objects))


# ----------------------------------------------------------------------------------------------- geometry


def inside(shape: str, s: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points at offsets (u, v) from the box centre lie in `shape` with box side `s` (WORLD.md table)."""
    h = s / 2
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= h * h
    if shape == "square":
        return (au <= h) & (av <= h)
    if shape == "triangle":  # apex (0, -h), base corners (+-h, h): half-width grows linearly downwards
        return (v <= h) & (au <= (v + h) / 2)
    if shape == "diamond":
        return au + av <= h
    if shape == "cross":
        w = s / 6
        return ((au <= w) & (av <= h)) | ((av <= w) & (au <= h))
    if shape == "star":
        return _inside_star(u, v, h, STAR_INNER_RATIO * h)
    raise ValueError(f"unknown shape {shape!r}")


def _inside_star(u: np.ndarray, v: np.ndarray, big_r: float, small_r: float) -> np.ndarray:
    """Star test by symmetry: fold the angle into the 36-degree wedge between an outer and an inner vertex,
    then the point is inside iff it is on the centre's side of the edge joining them."""
    rho = np.hypot(u, v)
    alpha = np.degrees(np.arctan2(u, -v)) % 72.0  # 0 = straight up
    beta = np.radians(np.minimum(alpha, 72.0 - alpha))
    px, py = rho * np.sin(beta), rho * np.cos(beta)
    dx, dy = small_r * math.sin(math.radians(36)), small_r * math.cos(math.radians(36)) - big_r
    return dx * (py - big_r) - dy * px <= 0


def area(shape: str, s: float) -> float:
    """Exact area of the shape with box side s (pixels squared)."""
    star = 5 * STAR_INNER_RATIO * math.sin(math.radians(36)) / 4  # ten triangles with sides R, r at 36 degrees
    factor = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9, "star": star}
    return factor[shape] * s * s


def centroid_offset(shape: str, s: float) -> float:
    """Vertical offset of the shape's area centroid below its box centre (only the triangle has one)."""
    return s / 6 if shape == "triangle" else 0.0


def object_box(s: float, cx: float, cy: float, pad: int = 1) -> tuple[int, int, int, int]:
    """Integer pixel window (x0, y0, x1, y1) holding the box of side s at (cx, cy), clipped to the canvas."""
    h = s / 2
    x0, y0 = max(0, math.floor(cx - h) - pad), max(0, math.floor(cy - h) - pad)
    x1, y1 = min(CANVAS, math.ceil(cx + h) + pad), min(CANVAS, math.ceil(cy + h) + pad)
    return x0, y0, x1, y1


def _samples(box: tuple[int, int, int, int], ss: int, cx: float, cy: float):
    x0, y0, x1, y1 = box
    u = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss - cx
    v = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss - cy
    return u[None, :], v[:, None]


def _reduce(mask: np.ndarray, ss: int) -> np.ndarray:
    h, w = mask.shape[0] // ss, mask.shape[1] // ss
    return mask.reshape(h, ss, w, ss).mean(axis=(1, 3))


def coverage(shape: str, s: float, cx: float, cy: float, box, ss: int = 4) -> np.ndarray:
    """Fraction of each pixel of `box` covered by the shape (ss x ss supersampling; exactly 1.0 inside)."""
    u, v = _samples(box, ss, cx, cy)
    return _reduce(inside(shape, s, u, v), ss)


def checker_coverages(s: float, cx: float, cy: float, box, ss: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(yellow, teal) coverage of a checker star: a 4 x 4 board of s/4 cells aligned to the box, yellow top-left."""
    u, v = _samples(box, ss, cx, cy)
    star = inside("star", s, u, v)
    i = np.floor((u + s / 2) / (s / 4)).astype(int)
    j = np.floor((v + s / 2) / (s / 4)).astype(int)
    yellow = (i + j) % 2 == 0
    return _reduce(star & yellow, ss), _reduce(star & ~yellow, ss)


def object_layers(obj: Obj, ss: int = 4):
    """(box, [(rgb, coverage), ...]) for one object: one flat layer, or two for the checker fill."""
    s = SIZES[obj.size]
    box = object_box(s, obj.cx, obj.cy)
    if obj.color == CHECKER:
        cy_, ct = checker_coverages(s, obj.cx, obj.cy, box, ss)
        return box, [(CHECKER_COLORS[0], cy_), (CHECKER_COLORS[1], ct)]
    return box, [(COLORS[obj.color], coverage(obj.shape, s, obj.cx, obj.cy, box, ss))]


# ----------------------------------------------------------------------------------------------- rendering


def render(scene: Scene) -> Image.Image:
    """64 x 64 RGB image of the scene: flat background, objects composited with their exact coverage."""
    canvas = np.empty((CANVAS, CANVAS, 3), dtype=np.float64)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        composite(canvas, *object_layers(obj))
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")


def composite(canvas: np.ndarray, box: tuple[int, int, int, int], layers) -> None:
    """Paint coverage layers [(rgb, coverage), ...] into `box` of a float canvas, in place."""
    x0, y0, x1, y1 = box
    sub = canvas[y0:y1, x0:x1]
    sub *= (1.0 - sum(cov for _, cov in layers))[..., None]
    for rgb, cov in layers:
        sub += cov[..., None] * np.asarray(rgb, dtype=np.float64)


def subject_scene(rng: np.random.Generator, background: str | None = None, cell: str | None = None) -> Scene:
    """An instance of Subject A: the large checker star alone, on the given (or a random) background and cell."""
    background = background or _pick(rng, tuple(BACKGROUNDS))
    cell = cell or _pick(rng, CELL_NAMES)
    (cx, cy), = _jitter(rng, [cell], [("star", "large")])
    return Scene("subject", background, (Obj("star", CHECKER, "large", cell, cx, cy),))


def render_subject(background: str | None = None, cell: str | None = None,
                   rng: np.random.Generator | None = None) -> Image.Image:
    """Instance image of Subject A (see `subject_scene`); rng=None means a fixed seed."""
    return render(subject_scene(rng if rng is not None else np.random.default_rng(0), background, cell))


# ----------------------------------------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _touched(shape: str, size: str, cx: float, cy: float, grow: int = 0) -> np.ndarray:
    """Canvas mask of every pixel the object covers at all, grown by `grow` pixels (8-neighbourhood)."""
    s = SIZES[size]
    x0, y0, x1, y1 = box = object_box(s, cx, cy, pad=grow + 1)
    padded = np.zeros((CANVAS + 2 * grow, CANVAS + 2 * grow), dtype=bool)
    padded[y0 + grow:y1 + grow, x0 + grow:x1 + grow] = coverage(shape, s, cx, cy, box) > 0
    out = np.zeros((CANVAS, CANVAS), dtype=bool)
    for dy in range(2 * grow + 1):
        for dx in range(2 * grow + 1):
            out |= padded[dy:dy + CANVAS, dx:dx + CANVAS]
    return out


def _pixel_span(c: float, s: float) -> tuple[int, int]:
    return math.floor(c - s / 2), math.ceil(c + s / 2) - 1  # first and last pixel index the box touches


def _apart(a: tuple, b: tuple) -> bool:
    """Whether objects (shape, size, cx, cy) a and b have at least GAP clean pixels between them: cheap box
    test first, exact pixel masks only when the boxes are close."""
    for axis in (2, 3):
        (a0, a1), (b0, b1) = _pixel_span(a[axis], SIZES[a[1]]), _pixel_span(b[axis], SIZES[b[1]])
        if b0 - a1 - 1 >= GAP or a0 - b1 - 1 >= GAP:
            return True
    return not (_touched(*a, grow=GAP) & _touched(*b)).any()


def _jitter(rng: np.random.Generator, cells: Sequence[str], specs: Sequence[tuple[str, str]]):
    """Centres = cell centres + uniform float jitter in [-3, 3] per axis. For several objects, draws that leave
    fewer than GAP clean background pixels between two objects are redrawn, so objects are always separate blobs,
    even after the mild blur of a generated image; WORLD.md bounds the jitter but is silent on overlap, and
    evaluation needs separable objects. (So with several objects the jitter is uniform given that condition.)"""
    for _ in range(10_000):
        offsets = rng.uniform(-JITTER, JITTER, size=(len(cells), 2))
        centres = [(CELLS[c][0] + float(dx), CELLS[c][1] + float(dy)) for c, (dx, dy) in zip(cells, offsets)]
        if len(cells) == 1:
            return centres
        objs = [(shape, size, cx, cy) for (shape, size), (cx, cy) in zip(specs, centres)]
        if all(_apart(objs[a], objs[b]) for a in range(len(objs)) for b in range(a)):
            return centres
    raise RuntimeError("could not place objects without touching")  # pragma: no cover - needs absurd luck


def _make_objects(rng, specs, cells) -> tuple[Obj, ...]:
    centres = _jitter(rng, cells, [(shape, size) for shape, _, size in specs])
    return tuple(Obj(shape, color, size, cell, cx, cy) for (shape, color, size), cell, (cx, cy)
                 in zip(specs, cells, centres))


def sample_scene(rng: np.random.Generator, kind: str | None = None) -> Scene:
    """A random scene of `kind` (uniform over KINDS when None), following WORLD.md's scene rules."""
    kind = kind or _pick(rng, KINDS)
    background = _pick(rng, tuple(BACKGROUNDS))
    if kind == "single":
        spec = (_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), _pick(rng, tuple(SIZES)))
        return Scene(kind, background, _make_objects(rng, [spec], [_pick(rng, CELL_NAMES)]))
    if kind == "pair":
        return _sample_pair(rng, background)
    if kind == "count":
        n = int(rng.integers(2, 5))
        shape, color = _pick(rng, SHAPES), _pick(rng, tuple(COLORS))
        cells = [CELL_NAMES[k] for k in sorted(rng.choice(9, size=n, replace=False))]
        return Scene(kind, background, _make_objects(rng, [(shape, color, "small")] * n, cells))
    raise ValueError(f"unknown scene kind {kind!r}")


def _sample_pair(rng: np.random.Generator, background: str) -> Scene:
    """Two small objects with different (colour, shape) on one row (left/right of) or one column (above/below)."""
    first = (_pick(rng, SHAPES), _pick(rng, tuple(COLORS)))
    second = first
    while second == first:
        second = (_pick(rng, SHAPES), _pick(rng, tuple(COLORS)))
    along_row = bool(rng.integers(2))
    line = int(rng.integers(3))
    a, b = (int(k) for k in rng.choice(3, size=2, replace=False))
    if along_row:
        cells = [CELL_NAMES[line * 3 + a], CELL_NAMES[line * 3 + b]]
        relation = "left of" if a < b else "right of"
    else:
        cells = [CELL_NAMES[a * 3 + line], CELL_NAMES[b * 3 + line]]
        relation = "above" if a < b else "below"
    specs = [(first[0], first[1], "small"), (second[0], second[1], "small")]
    return Scene("pair", background, _make_objects(rng, specs, cells), relation)


# ----------------------------------------------------------------------------------------------- captions

N_TEMPLATES = 3
_CELL_EN = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
            "left": "on the left", "center": "in the center", "right": "on the right",
            "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right"}
_REL_EN = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_REL_ZH = {"left of": "左边", "right of": "右边", "above": "上面", "below": "下面"}
_NUM_EN = {2: "two", 3: "three", 4: "four"}
_NUM_ZH = {2: "两个", 3: "三个", 4: "四个"}


# Every Chinese word the captions use. Chinese has no spaces, so a byte-level BPE trained on raw captions (Qwen2's
# pre-tokenizer keeps a run of Chinese characters together) learns whole phrases as single tokens ("小的黄色正方形"):
# size, colour and shape fused into one of hundreds of rare tokens. `caption_words` gives the tokenizer trainer the
# words instead, so that Chinese tokens are words, as English ones are.
ZH_WORDS = frozenset([*BACKGROUND_ZH.values(), *COLOR_ZH.values(), *SHAPE_ZH.values(), *SIZE_ZH.values(),
                      *CELL_ZH.values(), *_REL_ZH.values(), *_NUM_ZH.values(),
                      "背景", "上", "有", "一个", "的", "在", "图片", "中", "是", "位于", "和", "画面", "分别"])
_CJK_RUN = re.compile(r"[\u4e00-\u9fff]+")
_ZH_LONGEST = max(map(len, ZH_WORDS))


def caption_words(text: str) -> list[str]:
    """`text` cut at Chinese word boundaries (longest match in ZH_WORDS; unknown characters alone); the pieces
    concatenate back to `text` and non-Chinese stretches are kept whole."""
    out, last = [], 0
    for m in _CJK_RUN.finditer(text):
        out += [text[last:m.start()]] if m.start() > last else []
        run, i = m.group(), 0
        while i < len(run):
            n = next(n for n in range(min(_ZH_LONGEST, len(run) - i), 0, -1) if n == 1 or run[i:i + n] in ZH_WORDS)
            out.append(run[i:i + n])
            i += n
        last = m.end()
    return out + ([text[last:]] if last < len(text) else [])


COLOR_OMITTED = 0.15  # share of single and count training captions that leave the colour out


def _optional_attributes(rng: np.random.Generator, kind: str) -> frozenset[str]:
    """Which optional attributes a training caption states; each is a coin flip (cells rarer for counts).

    Colour is left out now and then for one-colour scenes (never for pairs, whose objects colours tell apart), so
    that prompts like "a circle" are in the training distribution and a model can answer them with any colour.
    """
    p = {"size": 0.5, "background": 0.5, "cell": 0.25 if kind == "count" else 0.5,
         "color": 1.0 if kind == "pair" else 1 - COLOR_OMITTED}
    return frozenset(a for a, q in p.items() if rng.random() < q)


def _stated(scene: Scene, optional: frozenset[str]) -> frozenset[str]:
    always = {"shape"} | ({"color", "relation"} if scene.kind == "pair" else set())
    return frozenset(always | ({"count"} if scene.kind == "count" else set()) | optional)


def caption_and_stated(scene: Scene, lang: str, rng: np.random.Generator) -> tuple[str, frozenset[str]]:
    """A random caption plus the set of attributes it states (for `lightbooth.eval.detector.Requirements`)."""
    optional = _optional_attributes(rng, scene.kind)
    template = int(rng.integers(N_TEMPLATES))
    return _compose(scene, lang, template, optional), _stated(scene, optional)


def caption(scene: Scene, lang: str, rng: np.random.Generator) -> str:
    """A random caption (random template, optional attributes randomly left out, never a wrong one)."""
    return caption_and_stated(scene, lang, rng)[0]


def full_caption(scene: Scene, lang: str, template: int = 0, leave_out: Sequence[str] = ()) -> str:
    """The caption of `template` stating every attribute (but the optional ones in `leave_out`: size, background,
    cell, color); it is also a possible output of `caption`."""
    optional = frozenset({"size", "background", "cell", "color"})
    if not optional.issuperset(leave_out):
        raise ValueError(f"only {', '.join(sorted(optional))} can be left out of a caption (got {list(leave_out)})")
    return _compose(scene, lang, template, optional - set(leave_out))


def _compose(scene: Scene, lang: str, template: int, opt: frozenset[str]) -> str:
    if scene.kind == "subject":
        raise ValueError("the world's captions never describe a subject")
    if lang not in ("en", "zh") or not 0 <= template < N_TEMPLATES:
        raise ValueError(f"bad caption language/template: {lang!r}, {template}")
    build = {"single": (_single_en, _single_zh), "pair": (_pair_en, _pair_zh), "count": (_count_en, _count_zh)}
    return build[scene.kind][lang == "zh"](scene, template, opt)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _en_object(o: Obj, opt, with_cell: bool = True) -> str:
    words = ([o.size] if "size" in opt else []) + ([o.color] if "color" in opt else []) + [o.shape]
    cell = f" {_CELL_EN[o.cell]}" if with_cell and "cell" in opt else ""
    return _article(" ".join(words)) + cell


def _zh_object(o: Obj, opt, with_cell: bool = False) -> str:
    cell = f"{CELL_ZH[o.cell]}的" if with_cell and "cell" in opt else ""
    size = f"{SIZE_ZH[o.size]}的" if "size" in opt else ""
    color = COLOR_ZH[o.color] if "color" in opt else ""
    return f"{cell}{size}{color}{SHAPE_ZH[o.shape]}"


def _single_en(scene: Scene, template: int, opt) -> str:
    obj, bg = _en_object(scene.objects[0], opt), scene.background
    if "background" not in opt:
        return ["", "", "an image of "][template] + obj
    return [f"{obj}, {bg} background", f"{obj} on a {bg} background", f"a {bg} background with {obj}"][template]


def _single_zh(scene: Scene, template: int, opt) -> str:
    o = scene.objects[0]
    obj, bg, cell = _zh_object(o, opt), BACKGROUND_ZH[scene.background], CELL_ZH[o.cell]
    has_bg, has_cell = "background" in opt, "cell" in opt
    if template == 0:
        head = "，".join(([f"{bg}背景上"] if has_bg else []) + ([cell] if has_cell else []))
        return f"{head}有一个{obj}" if head else f"一个{obj}"
    if template == 1:
        return f"一个{obj}" + (f"，在{cell}" if has_cell else "") + (f"，{bg}背景" if has_bg else "")
    return f"图片{cell if has_cell else '中'}有一个{obj}" + (f"，背景是{bg}的" if has_bg else "")


def _pair_en(scene: Scene, template: int, opt) -> str:
    a, b = scene.objects
    rel, bg = _REL_EN[scene.relation], scene.background
    core = f"{_en_object(a, opt)} {rel} {_en_object(b, opt)}"
    if template == 2:
        core = (f"{_en_object(a, opt)} and {_en_object(b, opt)}, the {a.color} {a.shape} {rel} "
                f"the {b.color} {b.shape}")
    if "background" not in opt:
        return core
    return [f"{core}, {bg} background", f"{core} on a {bg} background", f"{core}, on a {bg} background"][template]


def _pair_zh(scene: Scene, template: int, opt) -> str:
    a, b = scene.objects
    rel, bg, has_bg = _REL_ZH[scene.relation], BACKGROUND_ZH[scene.background], "background" in opt
    za, zb = _zh_object(a, opt, with_cell=True), _zh_object(b, opt, with_cell=True)
    if template == 0:
        return (f"{bg}背景上，" if has_bg else "") + f"{za}在{zb}的{rel}"
    if template == 1:
        return f"{za}位于{zb}的{rel}" + (f"，背景是{bg}的" if has_bg else "")
    short_a, short_b = _zh_object(a, ("color",)), _zh_object(b, ("color",))
    return (f"{bg}背景上" if has_bg else "图片中") + f"有一个{za}和一个{zb}，{short_a}在{short_b}的{rel}"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _join(names: Sequence[str], conj: str, sep: str) -> str:
    return names[0] if len(names) == 1 else sep.join(names[:-1]) + conj + names[-1]


def _count_en(scene: Scene, template: int, opt) -> str:
    o, n, bg = scene.objects[0], len(scene.objects), scene.background
    words = [_NUM_EN[n]] + ([o.size] if "size" in opt else []) + ([o.color] if "color" in opt else []) \
        + [_plural(o.shape)]
    core = " ".join(words)
    if "cell" in opt:
        core += " at " + _join([x.cell for x in scene.objects], " and ", ", ")
    if "background" not in opt:
        return core
    return [f"{core} on a {bg} background", f"{core}, {bg} background", f"a {bg} background with {core}"][template]


def _count_zh(scene: Scene, template: int, opt) -> str:
    o, n, bg, has_bg = scene.objects[0], len(scene.objects), BACKGROUND_ZH[scene.background], "background" in opt
    core = _NUM_ZH[n] + _zh_object(o, opt)
    if "cell" in opt:
        core += "，分别在" + _join([CELL_ZH[x.cell] for x in scene.objects], "和", "、")
    if template == 0:
        return (f"{bg}背景上有" if has_bg else "画面中有") + core
    if template == 1:
        return core + (f"，{bg}背景" if has_bg else "")
    return f"图片中有{core}" + (f"，背景是{bg}的" if has_bg else "")


# ----------------------------------------------------------------------------------------------- stream


def stream(seed: int, kinds: Sequence[str] = KINDS, weights: Sequence[float] | None = None,
           langs: Sequence[str] = ("en", "zh")) -> Iterator[tuple[Image.Image, str, Scene]]:
    """Endless (image, caption, scene) triples, fully determined by `seed`; nothing is read from disk."""
    rng = np.random.default_rng(seed)
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    kinds, langs = tuple(kinds), tuple(langs)
    while True:
        kind = kinds[int(rng.choice(len(kinds), p=p))]
        scene = sample_scene(rng, kind)
        lang = _pick(rng, langs)
        yield render(scene), caption(scene, lang, rng), scene
