"""The detector reads every rendered world image right, tolerates mild noise and blur, and rejects garbage."""


import numpy as np
import pytest
from PIL import ImageFilter

from lightbooth.data import shapes as S
from lightbooth.eval import detector as D


def one(shape, color="red", size="large", cell="center", cx=None, cy=None, background="white"):
    x, y = S.CELLS[cell]
    return S.Scene("single", background, (S.Obj(shape, color, size, cell, x if cx is None else cx,
                                                 y if cy is None else cy),))


def degrade(image, rng, blur=0.0, noise=0.0):
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(image).astype(float) + (rng.normal(0, noise, (64, 64, 3)) if noise else 0)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def described(det):
    return sorted((o.color, o.shape, o.size, o.cell) for o in det.objects)


def truth(scene):
    return sorted((o.color, o.shape, o.size, o.cell) for o in scene.objects)


# ----------------------------------------------------------------------------------------------- accuracy


def test_reads_300_random_scenes_exactly():
    rng = np.random.default_rng(123)
    for i in range(300):
        scene = S.sample_scene(rng, S.KINDS[i % 3])
        det = D.detect(S.render(scene))
        assert det.clean and det.background == scene.background, (scene, det)
        assert described(det) == truth(scene), (scene, det)
        assert D.check(scene, det), D.mismatches(scene, det)
        for o in det.objects:
            want = min(scene.objects, key=lambda w: (w.cx - o.cx) ** 2 + (w.cy - o.cy) ** 2)
            assert abs(want.cx - o.cx) < 0.3 and abs(want.cy - o.cy) < 0.3


def test_every_shape_colour_size_background():
    for shape in S.SHAPES:
        for color in S.COLORS:
            for size, background in (("small", "gray"), ("large", "black"), ("small", "white")):
                scene = one(shape, color, size, "top right", 49.2, 14.6, background)
                assert D.check(scene, S.render(scene)), D.mismatches(scene, S.render(scene))


def test_tolerates_mild_noise_and_blur():
    rng = np.random.default_rng(7)
    for i, (blur, noise) in enumerate([(0.0, 6.0), (0.6, 0.0), (0.8, 4.0)] * 20):
        scene = S.sample_scene(rng, S.KINDS[i % 3])
        image = degrade(S.render(scene), rng, blur, noise)
        assert D.check(scene, image), (blur, noise, scene, D.mismatches(scene, image))


def test_accepts_arrays_and_images_and_refuses_other_sizes():
    scene = one("diamond", "pink")
    image = S.render(scene)
    assert D.detect(image) == D.detect(np.asarray(image)) == D.detect(image.convert("RGBA"))
    with pytest.raises(ValueError):
        D.detect(np.zeros((32, 32, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------- rejections


def test_rejects_uniform_noise():
    rng = np.random.default_rng(0)
    for _ in range(5):
        noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        det = D.detect(noise)
        assert det.background is None and not det.clean
        assert not D.check(D.Requirements(one("circle"), frozenset({"shape"})), det)


def test_rejects_colour_outside_the_palette():
    for background in S.BACKGROUNDS:
        arr = np.asarray(S.render(one("circle", "purple", background=background))).copy()
        arr[np.all(arr == S.COLORS["purple"], axis=-1)] = (100, 50, 200)  # 42 away from purple
        det = D.detect(arr)
        assert not det.objects and any("not in the palette" in r for r in det.rejected)
        assert not D.check(D.Requirements(one("circle", "purple"), frozenset({"shape"})), det)


def test_rejects_an_extra_object_when_one_is_stated():
    two = S.Scene("count", "white", (S.Obj("circle", "red", "small", "left", 16, 32),
                                     S.Obj("circle", "red", "small", "right", 48, 32)))
    stated = D.Requirements(one("circle", "red", "small", "left"), frozenset({"shape", "color"}))
    assert D.check(stated, S.render(one("circle", "red", "small", "left", 16, 32)))
    assert not D.check(stated, S.render(two))
    other = S.Scene("pair", "white", (two.objects[0], S.Obj("star", "blue", "small", "right", 48, 32)), "left of")
    assert not D.check(stated, S.render(other))


def test_rejects_wrong_count_shape_colour_size_cell_background():
    rng = np.random.default_rng(3)
    scene = S.sample_scene(rng, "count")
    image = S.render(scene)
    assert D.check(scene, image)
    fewer = S.Scene("count", scene.background, scene.objects[:-1]) if len(scene.objects) > 2 else None
    more_cells = [c for c in S.CELL_NAMES if c not in {o.cell for o in scene.objects}]
    o = scene.objects[0]
    more = S.Scene("count", scene.background, scene.objects + (S.Obj(o.shape, o.color, "small", more_cells[0],
                                                                     *S.CELLS[more_cells[0]]),))
    for wrong in [more] + ([fewer] if fewer else []):
        assert not D.check(D.Requirements(wrong, frozenset({"shape", "color", "count"})), image)
    base = one("triangle", "green", "large", "bottom left", background="gray")
    image = S.render(base)
    assert D.check(base, image)
    for field, value in [("shape", "diamond"), ("shape", "square"), ("color", "cyan"), ("size", "small"),
                         ("cell", "left")]:
        kw = {f: getattr(base.objects[0], f) for f in ("shape", "color", "size", "cell")}
        kw[field] = value
        wrong = one(kw["shape"], kw["color"], kw["size"], kw["cell"], background="gray")
        assert not D.check(wrong, image), field
        assert D.check(D.Requirements(wrong, frozenset(D.ALL_ATTRIBUTES - {field})), image), field
    assert not D.check(one("triangle", "green", "large", "bottom left", background="white"), image)


def test_rejects_a_swapped_shape_for_every_pair_of_shapes():
    for drawn in S.SHAPES:
        image = S.render(one(drawn, "blue", "small", "center", 31.4, 33.1))
        for asked in S.SHAPES:
            assert D.check(D.Requirements(one(asked, "blue"), frozenset({"shape"})), image) == (drawn == asked)


def test_rejects_blurred_beyond_recognition():
    rng = np.random.default_rng(1)
    for i in range(20):
        scene = S.sample_scene(rng, S.KINDS[i % 3])
        image = S.render(scene)
        assert not D.check(D.Requirements(scene, frozenset({"shape", "color"})), degrade(image, rng, blur=6.0))
        if all(o.size == "small" for o in scene.objects):
            assert not D.check(D.Requirements(scene, frozenset({"shape", "color"})), degrade(image, rng, blur=3.0))


def test_rejects_mixed_colour_blob_and_clutter():
    arr = np.asarray(S.render(one("square", "red", "large", background="white"))).copy()
    arr[:, 32:][np.all(arr[:, 32:] == S.COLORS["red"], axis=-1)] = S.COLORS["blue"]  # half red, half blue
    assert not D.detect(arr).clean
    rng = np.random.default_rng(2)
    arr = np.asarray(S.render(one("circle", "red", "small", "top left", background="black"))).copy()
    ys, xs = rng.integers(30, 64, 40), rng.integers(30, 64, 40)
    arr[ys, xs] = (240, 240, 240)  # scattered specks
    det = D.detect(arr)
    assert any("clutter" in r for r in det.rejected) and not D.check(one("circle", "red", "small", "top left",
                                                                          background="black"), det)


def test_object_between_cells_has_no_cell():
    image = S.render(one("circle", "orange", "small", "left", 24.0, 32.0))
    (obj,) = D.detect(image).objects
    assert obj.cell is None and obj.shape == "circle"
    req = one("circle", "orange", "small", "left")
    assert not D.check(req, image)
    assert D.check(D.Requirements(req, frozenset({"shape", "color", "size", "background"})), image)


# ----------------------------------------------------------------------------------------------- partial prompts


def test_partial_requirements_check_only_what_is_stated():
    image = S.render(one("circle", "blue", "large", "top right", background="black"))
    asked = one("circle", "red", "small", "left", background="white")  # "a circle": only the shape is stated
    assert D.check(D.Requirements(asked, frozenset({"shape"})), image)
    assert not D.check(D.Requirements(asked, frozenset({"shape", "color"})), image)
    assert not D.check(D.Requirements(one("square"), frozenset({"shape"})), image)


def test_pair_relation():
    a, b = S.Obj("cross", "pink", "small", "top", 32, 16), S.Obj("circle", "green", "small", "bottom", 32, 48)
    scene = S.Scene("pair", "gray", (a, b), "above")
    image = S.render(scene)
    assert D.check(scene, image)
    rel_only = frozenset({"shape", "color", "relation"})
    assert D.check(D.Requirements(S.Scene("pair", "white", (a, b), "above"), rel_only), image)
    assert D.check(D.Requirements(S.Scene("pair", "white", (b, a), "below"), rel_only), image)
    for wrong in (S.Scene("pair", "gray", (a, b), "below"), S.Scene("pair", "gray", (b, a), "above")):
        assert not D.check(D.Requirements(wrong, rel_only), image)
    diagonal = S.Scene("pair", "gray", (a, S.Obj("circle", "green", "small", "bottom right", 48, 48)), "above")
    assert not D.check(D.Requirements(scene, rel_only), S.render(diagonal))  # "above" means the same column


# ----------------------------------------------------------------------------------------------- subject A


def test_checker_star_instances_are_found():
    rng = np.random.default_rng(8)
    for _ in range(18):
        scene = S.subject_scene(rng)
        image = S.render(scene)
        o = scene.objects[0]
        assert D.is_checker_star(image, o.cell, scene.background)
        assert D.is_checker_star(degrade(image, rng, blur=0.6, noise=4.0), o.cell)
        assert D.check(scene, image)
        other = "top left" if o.cell != "top left" else "bottom right"
        assert not D.is_checker_star(image, cell=other)
    assert D.detect(S.render_subject("black", "center")).checker_stars[0].cell == "center"


def test_plain_star_is_not_the_checker_star_and_vice_versa():
    for color in ("yellow", "cyan", "green"):
        plain = S.render(one("star", color, "large", background="gray"))
        assert not D.is_checker_star(plain) and D.detect(plain).objects[0].color == color
    checker = S.render_subject("gray", "center")
    a_star = D.Requirements(one("star", "yellow", "large", background="gray"), frozenset({"shape"}))
    assert not D.check(a_star, checker)  # asked for "a star", drew the subject: wrong
    assert D.check(a_star, S.render(one("star", "purple", background="gray")))


def test_wrong_checker_patterns_are_rejected():
    arr = np.asarray(S.render_subject("white", "center")).copy()
    yellow, teal = np.all(arr == S.COLORS["yellow"], -1), np.all(arr == S.TEAL, -1)
    swapped = arr.copy()
    swapped[yellow], swapped[teal] = S.TEAL, S.COLORS["yellow"]  # teal top-left
    assert not D.is_checker_star(swapped)
    flat = arr.copy()
    flat[teal] = S.COLORS["yellow"]  # yellow star with a few teal-yellow mixes at cell borders
    assert not D.is_checker_star(flat)
    half = arr.copy()
    half[np.all(arr == S.TEAL, -1) | np.all(arr == S.COLORS["yellow"], -1)] = S.TEAL
    half[:32][np.all(half[:32] == S.TEAL, -1)] = S.COLORS["yellow"]  # top half yellow, bottom teal
    assert not D.is_checker_star(half)
    small = S.Scene("subject", "white", (S.Obj("star", S.CHECKER, "small", "center", 32, 32),))
    assert not D.is_checker_star(S.render(small))
