"""Novel-content images for the VAE (data/novel.py): deterministic, outside the world's palette, Subject A held out,
and the world-only crop stream of the earlier recipes unchanged when they are off."""

import numpy as np

from lightbooth.data import novel, shapes
from lightbooth.eval import detector
from lightbooth.training.base import CropStream

WORLD_RGB = {*map(tuple, shapes.COLORS.values()), *map(tuple, shapes.BACKGROUNDS.values())}


def test_render_novel_is_deterministic_and_full_size():
    a = [np.asarray(novel.render_novel(np.random.default_rng(3))) for _ in range(2)]
    assert a[0].shape == (64, 64, 3) and np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], np.asarray(novel.render_novel(np.random.default_rng(4))))


def test_novel_images_paint_colours_and_patterns_the_world_never_shows():
    rng = np.random.default_rng(0)
    images = [np.asarray(novel.render_novel(rng)) for _ in range(32)]
    off_palette = [sum(tuple(p) not in WORLD_RGB for p in im.reshape(-1, 3)) / 4096 for im in images]
    assert np.mean([f > 0.05 for f in off_palette]) > 0.8  # most images are mostly new colours
    # two-colour fills: some objects hold two large flat areas of different colours (a pattern, not edges)
    patterned = 0
    for im in images:
        colours, counts = np.unique(im.reshape(-1, 3), axis=0, return_counts=True)
        patterned += (counts >= 12).sum() >= 4  # background + at least one object with two fills, or several
    assert patterned >= 8
    # none of them is Subject A (the held-out yellow/teal checker star)
    assert not any(detector.is_checker_star(novel.render_novel(np.random.default_rng(k))) for k in range(64))


def test_crop_stream_without_novel_content_is_the_world_stream_of_earlier_recipes():
    crops = iter(CropStream(seed=5, crop=32, align=4))
    rng = np.random.default_rng([5, 7])
    for _ in range(3):
        img = np.asarray(shapes.render(shapes.sample_scene(rng)), dtype=np.float32)
        y, x = (rng.integers(0, (64 - 32) // 4 + 1, 2) * 4).tolist()
        expected = img[y:y + 32, x:x + 32].transpose(2, 0, 1) / 127.5 - 1
        assert np.array_equal(next(crops).numpy(), expected)


def test_crop_stream_with_novel_content_draws_other_images_in_range():
    stream = iter(CropStream(seed=5, crop=32, align=4, novel=1.0))
    crops = [next(stream) for _ in range(8)]
    world = iter(CropStream(seed=5, crop=32, align=4))
    assert all(not np.array_equal(c.numpy(), next(world).numpy()) for c in crops)
    assert all(c.shape == (3, 32, 32) and c.min() >= -1 and c.max() <= 1 for c in crops)
