"""ShapesWorld generator throughput (pytest-benchmark).

Run: ``pytest benchmarks/bench_shapesworld.py --benchmark-only`` (each test records
``images_per_s`` in ``extra_info``; ``-s`` also prints it)."""
from __future__ import annotations

import numpy as np
import pytest

from fmrt.data import ShapesWorld, ShapesWorldDataset, render_batch

BATCH = 256


def _report(benchmark, n_images: int, name: str) -> None:
    ips = n_images / benchmark.stats.stats.mean
    benchmark.extra_info["images_per_s"] = round(ips, 1)
    print(f"\n{name}: {ips:,.0f} images/s")


@pytest.mark.parametrize("image_size", [64, 224])
def test_clip_batch(benchmark, image_size):
    world = ShapesWorld(image_size, seed=0)
    rng = np.random.default_rng(0)
    out = benchmark(world.clip_batch, BATCH, rng)
    assert out["images"].shape == (BATCH, image_size, image_size, 3)
    _report(benchmark, BATCH, f"clip_batch({BATCH}) @ {image_size}px")


def test_render_batch(benchmark):
    world = ShapesWorld(64, seed=0)
    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(rng) for _ in range(BATCH)]
    imgs = benchmark(render_batch, scenes)
    assert imgs.shape == (BATCH, 64, 64, 3)
    _report(benchmark, BATCH, "render_batch @ 64px")


def test_sample_scenes(benchmark):
    world = ShapesWorld(64, seed=0)
    rng = np.random.default_rng(0)
    benchmark(lambda: [world.sample_scene(rng) for _ in range(BATCH)])
    _report(benchmark, BATCH, "sample_scene @ 64px")


def test_classification_set(benchmark):
    world = ShapesWorld(64, seed=0)
    imgs, labels = benchmark(world.classification_set, 1024, 0, "color_shape")
    assert imgs.shape[0] == 1024
    _report(benchmark, 1024, "classification_set(1024)")


def test_hard_negative_set(benchmark):
    world = ShapesWorld(64, seed=0)
    benchmark(world.hard_negative_set, 128, 0, 3)
    _report(benchmark, 128, "hard_negative_set(128, 3 negatives)")


def test_winoground_set(benchmark):
    world = ShapesWorld(64, seed=0)
    benchmark(world.winoground_set, 64, 0)
    _report(benchmark, 128, "winoground_set(64 pairs)")


def test_dataset_items(benchmark):
    ds = ShapesWorldDataset("train", 10_000)
    benchmark(lambda: [ds[i] for i in range(64)])
    _report(benchmark, 64, "ShapesWorldDataset item (all GT fields)")
