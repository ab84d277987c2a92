"""The shapes world generator follows WORLD.md exactly: colours, geometry, scene rules, captions, determinism."""

import math
import re

import numpy as np
import pytest

from lightbooth.data import shapes as S
from lightbooth.eval import detector as D


def one(shape, color="red", size="large", cell="center", cx=32.0, cy=32.0, background="white"):
    return S.Scene("single", background, (S.Obj(shape, color, size, cell, cx, cy),))


def pixels(scene):
    return np.asarray(S.render(scene)).astype(int)


def exact(arr, rgb):
    return np.all(arr == np.asarray(rgb), axis=-1)


# ----------------------------------------------------------------------------------------------- tables


def test_tables_are_worlds():
    assert S.BACKGROUNDS == {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
    assert S.COLORS["cyan"] == (30, 200, 210) and S.COLORS["pink"] == (240, 120, 190) and len(S.COLORS) == 8
    assert S.SHAPES == ("circle", "square", "triangle", "star", "diamond", "cross")
    assert S.SIZES == {"small": 14, "large": 26}
    assert S.CELLS["bottom right"] == (48, 48) and S.CELLS["top"] == (32, 16) and len(S.CELLS) == 9
    assert S.COLOR_ZH["cyan"] == "青色" and S.SHAPE_ZH["star"] == "五角星" and S.SHAPE_ZH["cross"] == "十字"
    assert S.CELL_ZH["top"] == "上方" and S.CELL_ZH["bottom right"] == "右下角" and S.BACKGROUND_ZH["gray"] == "灰色"


# ----------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("background", list(S.BACKGROUNDS))
@pytest.mark.parametrize("shape", S.SHAPES)
def test_background_and_interior_colours_are_exact(shape, background):
    for color, rgb in S.COLORS.items():
        arr = pixels(one(shape, color, background=background, cx=32.3, cy=33.0))
        assert arr.shape == (64, 64, 3)
        assert exact(arr[:6], S.BACKGROUNDS[background]).all() and exact(arr[:, -6:], S.BACKGROUNDS[background]).all()
        assert tuple(arr[34, 32]) == rgb  # just below the centre is inside every shape
        colours = {tuple(c) for c in arr.reshape(-1, 3)}
        assert rgb in colours and len(colours) > 2  # anti-aliased edge pixels are mixes


def test_square_is_the_full_box():
    arr = pixels(one("square", "blue", "small", cx=32.0, cy=32.0))
    ys, xs = np.nonzero(exact(arr, S.COLORS["blue"]))
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (25, 38, 25, 38)
    assert len(xs) == 14 * 14 and exact(arr, S.BACKGROUNDS["white"]).sum() == 64 * 64 - 196


def test_circle_area_is_pi_r_squared():
    r = 13
    arr = pixels(one("circle", "green", "large", background="black"))
    solid = exact(arr, S.COLORS["green"]).sum()
    touched = (~exact(arr, S.BACKGROUNDS["black"])).sum()
    assert solid < math.pi * r * r < touched
    assert abs(solid - math.pi * r * r) < 2 * math.pi * r  # within one perimeter's worth of edge pixels
    cov = S.coverage("circle", 26, 32.0, 32.0, (0, 0, 64, 64))
    assert cov.sum() == pytest.approx(math.pi * r * r, rel=0.01)


def test_triangle_apex_on_top_base_along_bottom():
    arr = exact(pixels(one("triangle", "orange", "large")), S.COLORS["orange"])
    rows = np.nonzero(arr.any(axis=1))[0]
    assert rows.min() in (19, 20, 21) and rows.max() == 44  # apex near y = 19, base row ends at y = 45
    top_cols = np.nonzero(arr[rows.min()])[0]
    assert abs(top_cols.mean() + 0.5 - 32) <= 0.5  # apex in the middle of the top edge
    widths = arr.sum(axis=1)
    assert widths[44] == widths.max() > widths[32] and widths[44] >= 24  # widest row is the bottom, ~s wide
    assert S.coverage("triangle", 26, 32, 32, (0, 0, 64, 64)).sum() == pytest.approx(26 * 26 / 2, rel=0.01)


def test_star_points_up_with_inner_radius():
    cov = S.coverage("star", 26, 32.0, 32.0, (0, 0, 64, 64))
    assert cov[19:21, 31:33].min() > 0 and cov[18, :].max() == 0  # outer point straight up, top of the box y=19
    assert cov[39, 31:33].max() == 0  # straight down is an inner vertex at 0.382 * 13 = 5 px below the centre
    assert cov[35, 31:33].min() == 1.0
    big_r, small_r = 13, 0.382 * 13
    assert cov.sum() == pytest.approx(5 * big_r * small_r * math.sin(math.radians(36)), rel=0.02)


def test_diamond_and_cross_geometry():
    # Areas at a centre off the 4 x 4 sample lattice (on it, diagonal edges pass through samples: ~2% bias).
    area = lambda shape: S.coverage(shape, 26, 32.13, 31.71, (0, 0, 64, 64)).sum()  # noqa: E731
    assert area("diamond") == pytest.approx(26 * 26 / 2, rel=0.01)
    assert area("cross") == pytest.approx(26 * 26 * 5 / 9, rel=0.01)  # two s x s/3 bars minus their overlap
    dia = S.coverage("diamond", 26, 32.0, 32.0, (0, 0, 64, 64))
    assert dia[19, 31:33].min() > 0 and dia[20, 20] == 0  # corner at the top edge's midpoint, box corner empty
    cross = S.coverage("cross", 26, 32.0, 32.0, (0, 0, 64, 64))
    assert cross[32, 19] == 1.0 and cross[22, 22] == 0.0 and cross[19, 32] == 1.0


def test_checker_star_fill():
    cx, cy = 31.0, 33.0
    scene = S.Scene("subject", "gray", (S.Obj("star", S.CHECKER, "large", "center", cx, cy),))
    arr = pixels(scene)
    yellow, teal = exact(arr, S.COLORS["yellow"]), exact(arr, S.TEAL)
    assert yellow.sum() > 60 and teal.sum() > 60
    ys, xs = np.mgrid[0:64, 0:64]
    parity = (np.floor((xs + 0.5 - (cx - 13)) / 6.5) + np.floor((ys + 0.5 - (cy - 13)) / 6.5)) % 2
    assert (parity[yellow] == 0).all() and (parity[teal] == 1).all()  # yellow on the cells of the top-left one
    star = S.coverage("star", 26, cx, cy, (0, 0, 64, 64)) == 1.0
    assert not (exact(arr, S.BACKGROUNDS["gray"]) & star).any()


def test_render_subject_any_background_and_cell():
    rng = np.random.default_rng(3)
    for background in S.BACKGROUNDS:
        for cell in ("top left", "bottom right", "center"):
            arr = np.asarray(S.render_subject(background, cell, rng)).astype(int)
            ys, xs = np.nonzero(~exact(arr, S.BACKGROUNDS[background]))
            assert abs(xs.mean() - S.CELLS[cell][0]) < 4.5 and abs(ys.mean() - S.CELLS[cell][1]) < 4.5
    with pytest.raises(ValueError):
        S.caption(S.subject_scene(rng), "en", rng)  # the world's captions never describe a subject


# ----------------------------------------------------------------------------------------------- scenes


def test_scene_rules_hold():
    rng = np.random.default_rng(11)
    kinds = set()
    for _ in range(600):
        scene = S.sample_scene(rng)
        kinds.add(scene.kind)
        for o in scene.objects:
            assert abs(o.cx - S.CELLS[o.cell][0]) <= 3 and abs(o.cy - S.CELLS[o.cell][1]) <= 3
        cells = [o.cell for o in scene.objects]
        assert len(set(cells)) == len(cells)
        if scene.kind == "single":
            assert len(scene.objects) == 1 and scene.relation is None
        elif scene.kind == "pair":
            a, b = scene.objects
            assert a.size == b.size == "small" and (a.color, a.shape) != (b.color, b.shape)
            (ax, ay), (bx, by) = S.CELLS[a.cell], S.CELLS[b.cell]
            want = {"left of": ay == by and ax < bx, "right of": ay == by and ax > bx,
                    "above": ax == bx and ay < by, "below": ax == bx and ay > by}
            assert want[scene.relation]
        else:
            assert 2 <= len(scene.objects) <= 4 and scene.relation is None
            assert len({(o.shape, o.color, o.size) for o in scene.objects}) == 1 and scene.objects[0].size == "small"
    assert kinds == set(S.KINDS)


def test_objects_keep_apart():
    """At least GAP clean background pixels between any two objects, so they stay separate blobs."""
    rng = np.random.default_rng(5)
    for _ in range(100):
        scene = S.sample_scene(rng, "count" if _ % 2 else "pair")
        spots = [np.argwhere(S.coverage(o.shape, S.SIZES[o.size], o.cx, o.cy, (0, 0, 64, 64)) > 0)
                 for o in scene.objects]
        for i in range(len(spots)):
            for j in range(i):
                chebyshev = np.abs(spots[i][:, None, :] - spots[j][None, :, :]).max(axis=-1)
                assert chebyshev.min() >= S.GAP + 1


def test_stream_is_deterministic():
    def take(seed, n=12):
        it = S.stream(seed)
        return [(np.asarray(im).tobytes(), cap, sc) for im, cap, sc in (next(it) for _ in range(n))]

    first = take(7)
    assert first == take(7) and first != take(8)
    assert any(re.search("[\u4e00-\u9fff]", cap) for _, cap, _ in first)
    assert any(cap.isascii() for _, cap, _ in first)
    only = S.stream(1, kinds=("count",), langs=("zh",))
    for _ in range(5):
        _, cap, scene = next(only)
        assert scene.kind == "count" and not cap.isascii()


# ----------------------------------------------------------------------------------------------- captions


def test_worlds_example_captions():
    single = one("circle", "red", "large", "left", 16.0, 32.0, "white")
    assert S.full_caption(single, "en", 0) == "a large red circle on the left, white background"
    assert S.full_caption(single, "zh", 0) == "白色背景上，左边有一个大的红色圆形"
    pair = S.Scene("pair", "gray", (S.Obj("square", "blue", "small", "left", 16, 32),
                                    S.Obj("star", "yellow", "small", "right", 48, 32)), "left of")
    tri = S.Obj("triangle", "green", "small", "top", 32, 16)
    count = S.Scene("count", "black", (tri, S.Obj("triangle", "green", "small", "center", 32, 32),
                                       S.Obj("triangle", "green", "small", "bottom", 32, 48)))
    rng = np.random.default_rng(0)
    seen = {(sc, lang): {S.caption(sc, lang, rng) for _ in range(300)} for sc in (pair, count) for lang in ("en", "zh")}
    assert "a blue square to the left of a yellow star" in seen[pair, "en"]
    assert "蓝色正方形在黄色五角星的左边" in seen[pair, "zh"]
    assert "three green triangles on a black background" in seen[count, "en"]
    assert "黑色背景上有三个绿色三角形" in seen[count, "zh"]
    assert "two small orange crosses" in {S.caption(S.Scene("count", "white", (
        S.Obj("cross", "orange", "small", "top", 32, 16), S.Obj("cross", "orange", "small", "left", 16, 32))),
        "en", rng) for _ in range(100)}


def test_training_captions_sometimes_leave_the_colour_out_but_never_for_pairs():
    """So that "a circle" is a prompt the model has seen, and can answer with any colour."""
    rng = np.random.default_rng(3)
    single = one("circle", "red", "large", "left", 16.0, 32.0, "white")
    caps = [S.caption_and_stated(single, "en", rng) for _ in range(400)]
    assert "a circle" in {c for c, _ in caps}
    no_colour = [c for c, st in caps if "color" not in st]
    assert 0.08 < len(no_colour) / len(caps) < 0.25 and not any("red" in c for c in no_colour)
    assert "一个圆形" in {S.caption(single, "zh", rng) for _ in range(400)}
    pair = S.sample_scene(rng, "pair")
    assert all("color" in S.caption_and_stated(pair, "en", rng)[1] for _ in range(200))


def test_at_least_three_templates_per_kind_and_language():
    rng = np.random.default_rng(2)
    for kind in S.KINDS:
        scene = S.sample_scene(rng, kind)
        for lang in ("en", "zh"):
            assert len({S.full_caption(scene, lang, t) for t in range(S.N_TEMPLATES)}) >= 3
            assert len({S.caption(scene, lang, rng) for _ in range(200)}) >= 6


# A tiny caption reader, written from WORLD.md's vocabulary, to check every claim a caption makes.
_ALT = lambda names: "|".join(sorted(names, key=len, reverse=True))  # noqa: E731
_COL, _SHP, _CELL = _ALT(S.COLORS), _ALT(S.SHAPES), _ALT(S.CELLS)
_CELL_PHRASE = {"in the top left": "top left", "at the top": "top", "in the top right": "top right",
                "on the left": "left", "in the center": "center", "on the right": "right",
                "in the bottom left": "bottom left", "at the bottom": "bottom", "in the bottom right": "bottom right"}
_OBJ_EN = re.compile(rf"\b(an?|two|three|four|the) (?:(small|large) )?(?:({_COL}) )?({_SHP})(?:e?s)?\b"
                     rf"(?: ({_ALT(_CELL_PHRASE)}))?")
_Z = {v: k for table in (S.COLOR_ZH, S.SHAPE_ZH, S.CELL_ZH, S.BACKGROUND_ZH, S.SIZE_ZH) for k, v in table.items()}
_OBJ_ZH = re.compile(rf"(?:({_ALT(S.CELL_ZH.values())})的)?(?:(大|小)的)?({_ALT(S.COLOR_ZH.values())})?"
                     rf"({_ALT(S.SHAPE_ZH.values())})")
_REL = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below",
        "左边": "left of", "右边": "right of", "上面": "above", "下面": "below"}
_NUM = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "两": 2, "三": 3, "四": 4}


def read_caption(text: str, lang: str) -> dict:
    """Claims: background, objects [(size, colour, shape, cell)], count, relation, count cells."""
    claims = {"objects": []}

    def take(pattern, key, conv=lambda m: m):
        nonlocal text
        m = re.search(pattern, text)
        if m:
            claims[key] = conv(m)
            text = text[:m.start()] + " | " + text[m.end():]

    if lang == "en":
        take(r"\b(white|black|gray) background", "background", lambda m: m[1])
        take(r"\b(to the left of|to the right of|above|below)\b", "relation", lambda m: _REL[m[1]])
        take(rf" at ((?:{_CELL})(?:(?:, | and )(?:{_CELL}))*)", "cells", lambda m: re.split(", | and ", m[1]))
        for m in _OBJ_EN.finditer(text):
            claims["objects"].append((m[2], m[3], m[4], _CELL_PHRASE.get(m[5])))
            if m[1] != "the":
                claims.setdefault("count", _NUM[m[1]])
        text = _OBJ_EN.sub(" | ", text)
        leftover = re.findall(rf"\b(?:{_COL}|{_SHP}|small|large|white|black|gray|left|right|top|bottom|center)",
                              text)
    else:
        take(r"(白色|黑色|灰色)背景|背景是(白色|黑色|灰色)的", "background", lambda m: _Z[m[1] or m[2]])
        take(r"的(左边|右边|上面|下面)(?=$|，)", "relation", lambda m: _REL[m[1]])
        cz = _ALT(S.CELL_ZH.values())
        take(rf"分别在((?:{cz})(?:[、和](?:{cz}))*)", "cells", lambda m: [_Z[c] for c in re.split("[、和]", m[1])])
        take(r"(两|三|四)个", "count", lambda m: _NUM[m[1]])
        for m in _OBJ_ZH.finditer(text):
            claims["objects"].append((_Z.get(m[2]), _Z.get(m[3]), _Z[m[4]], _Z.get(m[1])))
        text = _OBJ_ZH.sub(" | ", text)
        loose = re.findall(cz, text)  # a single object's position stands on its own
        if loose:
            assert len(loose) == 1 and len(claims["objects"]) == 1, text
            size, color, shape, _ = claims["objects"][0]
            claims["objects"][0] = (size, color, shape, _Z[loose[0]])
            text = text.replace(loose[0], " | ")
        leftover = re.findall("|".join(_Z), text)
    assert not leftover, f"unread vocabulary {leftover} in {text!r}"
    return claims


def assert_claims_true(claims: dict, det: D.Detection, scene: S.Scene, cap: str):
    """Every claim holds in the detection of the rendered image (and in the scene)."""
    assert det.clean and len(det.objects) == len(scene.objects)
    if "background" in claims:
        assert claims["background"] == det.background == scene.background, cap
    found = {(o.color, o.shape): [] for o in det.objects}
    for o in det.objects:
        found[o.color, o.shape].append(o)
    if all(c is None for _, c, _, _ in claims["objects"]):  # colour left out (one-colour scenes only)
        assert scene.kind != "pair" and len({o.color for o in det.objects}) == 1, cap
        claims["objects"] = [(z, det.objects[0].color, s, c) for z, _, s, c in claims["objects"]]
    assert {(c, s) for _, c, s, _ in claims["objects"]} == set(found), cap
    for size, color, shape, cell in claims["objects"]:
        assert size is None or all(o.size == size for o in found[color, shape]), cap
        assert cell is None or [o.cell for o in found[color, shape]] == [cell], cap
    if scene.kind != "pair":
        assert claims.get("count", 1) == len(det.objects), cap
    else:
        assert "count" not in claims or claims["count"] == 1
    if "cells" in claims:
        assert sorted(claims["cells"]) == sorted(o.cell for o in det.objects), cap
    if scene.kind == "pair":
        (a,), (b,) = (found[c, s] for _, c, s, _ in claims["objects"][:2])
        (ax, ay), (bx, by) = S.CELLS[a.cell], S.CELLS[b.cell]
        holds = {"left of": ay == by and ax < bx, "right of": ay == by and ax > bx,
                 "above": ax == bx and ay < by, "below": ax == bx and ay > by}
        assert holds[claims["relation"]], cap


def test_captions_never_state_a_wrong_attribute():
    rng = np.random.default_rng(21)
    for i in range(150):
        scene = S.sample_scene(rng, S.KINDS[i % 3])
        det = D.detect(S.render(scene))
        for lang in ("en", "zh"):
            caps = [S.caption(scene, lang, rng), S.full_caption(scene, lang, i % S.N_TEMPLATES)]
            for cap in caps:
                assert_claims_true(read_caption(cap, lang), det, scene, cap)


def test_full_caption_states_everything():
    rng = np.random.default_rng(4)
    for kind in S.KINDS:
        scene = S.sample_scene(rng, kind)
        for lang in ("en", "zh"):
            for t in range(S.N_TEMPLATES):
                claims = read_caption(S.full_caption(scene, lang, t), lang)
                assert claims["background"] == scene.background
                everyone = {(o.color, o.shape) for o in scene.objects}
                assert {(c, s) for z, c, s, _ in claims["objects"] if z} == everyone  # sizes
                if kind == "count":
                    assert sorted(claims["cells"]) == sorted(o.cell for o in scene.objects)
                    assert claims["count"] == len(scene.objects)
                else:
                    assert {(c, s) for _, c, s, cell in claims["objects"] if cell} == everyone


def test_full_caption_leaves_out_only_what_it_is_told():
    rng = np.random.default_rng(5)
    for kind in S.KINDS:
        scene = S.sample_scene(rng, kind)
        for lang in ("en", "zh"):
            for t in range(S.N_TEMPLATES):
                claims = read_caption(S.full_caption(scene, lang, t, ("cell",)), lang)
                assert claims["background"] == scene.background and not claims.get("cells")
                assert not any(cell for *_, cell in claims["objects"])
                assert {(c, s) for z, c, s, _ in claims["objects"] if z} == {(o.color, o.shape) for o in scene.objects}
    with pytest.raises(ValueError, match="can be left out"):
        S.full_caption(scene, "en", 0, ("shape",))  # a caption always names the shape


def test_chinese_captions_use_world_names():
    rng = np.random.default_rng(9)
    for _ in range(60):
        scene = S.sample_scene(rng)
        cap, stated = S.caption_and_stated(scene, "zh", rng)
        assert not re.search("[A-Za-z]", cap)
        for o in scene.objects:
            assert (S.COLOR_ZH[o.color] if "color" in stated else "") + S.SHAPE_ZH[o.shape] in cap
        if scene.kind == "count":
            assert {2: "两个", 3: "三个", 4: "四个"}[len(scene.objects)] in cap


def test_caption_reader_catches_lies():
    """The round trip above is only as good as the reader: a caption with one wrong word must fail it."""
    scene = S.Scene("pair", "black", (S.Obj("square", "blue", "small", "left", 16, 32),
                                      S.Obj("star", "yellow", "small", "right", 48, 32)), "left of")
    det = D.detect(S.render(scene))
    good = [(S.full_caption(scene, "en", 1), "en"), (S.full_caption(scene, "zh", 0), "zh")]
    for cap, lang in good:
        assert_claims_true(read_caption(cap, lang), det, scene, cap)
    lies = [("a small blue square on the left to the right of a small yellow star on the right", "en"),
            ("a small red square on the left to the left of a small yellow star on the right", "en"),
            ("a large blue square on the left to the left of a small yellow star on the right", "en"),
            ("a blue square to the left of a yellow star, white background", "en"),
            ("a blue square in the center to the left of a yellow star", "en"),
            ("黑色背景上，左边的蓝色正方形在右边的黄色五角星的上面", "zh"),
            ("黑色背景上，左边的蓝色圆形在右边的黄色五角星的左边", "zh"),
            ("灰色背景上，蓝色正方形在黄色五角星的左边", "zh")]
    for cap, lang in lies:
        with pytest.raises(AssertionError):
            assert_claims_true(read_caption(cap, lang), det, scene, cap)
