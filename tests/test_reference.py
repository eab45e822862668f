"""Reference transforms, host-free: crop positions, filters, sharpening, noise negatives, tiles, schedules."""

from __future__ import annotations

import pytest
import torch

from ipa_train.errors import IPAKitError
from ipa_train.reference import noise, prep, schedule, tiles


def _bands(h: int, w: int) -> torch.Tensor:
    """[1, h, w, 3] whose red channel is the column index / w and green the row index / h: a crop shows its origin."""
    ys = torch.arange(h).float().view(h, 1).expand(h, w) / h
    xs = torch.arange(w).float().view(1, w).expand(h, w) / w
    return torch.stack([xs, ys, torch.full((h, w), 0.5)], dim=-1)[None]


@pytest.mark.parametrize("position,top,left", [("center", 0, 20), ("left", 0, 0), ("right", 0, 40),
                                               ("top", 0, 20), ("bottom", 0, 20)])
def test_crop_positions_on_a_wide_image(position, top, left):
    img = _bands(40, 80)
    out = prep.square(img, position)
    assert out.shape == (1, 40, 40, 3)
    assert torch.equal(out, img[:, top : top + 40, left : left + 40])


@pytest.mark.parametrize("position,top", [("center", 30), ("top", 0), ("bottom", 60), ("left", 30), ("right", 30)])
def test_crop_positions_on_a_tall_image(position, top):
    img = _bands(100, 40)
    assert torch.equal(prep.square(img, position), img[:, top : top + 40])


def test_pad_and_squash():
    img = _bands(20, 40)
    padded = prep.square(img, "pad", fill=(0.0, 0.0, 0.0))
    assert padded.shape == (1, 40, 40, 3)
    assert torch.equal(padded[:, 10:30], img) and padded[:, :10].abs().sum() == 0 and padded[:, 30:].abs().sum() == 0
    assert torch.equal(prep.square(img, "squash"), img)


@pytest.mark.parametrize("interpolation", prep.INTERPOLATIONS)
def test_resize_filters_keep_a_flat_image_and_follow_a_ramp(interpolation):
    flat = torch.full((1, 37, 53, 3), 0.3)
    torch.testing.assert_close(prep.resize(flat, 16, 16, interpolation), torch.full((1, 16, 16, 3), 0.3))
    ramp = prep.resize(_bands(64, 64), 16, 16, interpolation)[0, 8, :, 0]  # red = x / 64, sampled at 16 columns
    assert (ramp[1:] > ramp[:-1]).all() and abs(float(ramp[8]) - 0.53) < 0.05


def test_filters_differ_and_lanczos_matches_pil():
    pil = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 40, 40, 3, generator=g)
    outs = {i: prep.resize(img, 17, 17, i) for i in prep.INTERPOLATIONS}
    assert len({tuple(o.flatten().tolist()) for o in outs.values()}) == 4
    import numpy as np

    ch = pil.fromarray(img[0, :, :, 0].numpy().astype(np.float32), mode="F").resize((17, 17), pil.LANCZOS)
    ours = outs["lanczos"][0, :, :, 0].numpy()
    assert np.abs(np.clip(np.asarray(ch), 0, 1) - ours).max() < 0.02  # same filter family; PIL clamps weights differently at borders


def test_sharpening_zero_is_identity_and_raises_edge_contrast():
    img = torch.zeros(1, 16, 16, 3)
    img[:, :, 8:] = 0.6
    img[:, :, :8] = 0.3
    assert prep.sharpen(img, 0.0) is img
    sharp = prep.sharpen(img, 1.0)
    assert sharp[0, 4, 7, 0] < 0.3 and sharp[0, 4, 8, 0] > 0.6  # darker dark side, brighter bright side
    assert torch.equal(sharp[0, 4, :4], img[0, 4, :4])  # flat areas unchanged


def test_prepare_gives_clip_size_and_rejects_bad_shapes():
    out = prep.prepare(_bands(50, 90), 32, "right", "lanczos", 0.5)
    assert out.shape == (1, 32, 32, 3) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(IPAKitError, match="expected an IMAGE"):
        prep.prepare(torch.zeros(3, 8, 8))
    with pytest.raises(IPAKitError, match="not one of"):
        prep.prepare(_bands(8, 8), crop="middle")


@pytest.mark.parametrize("with_reference", [True, False])
def test_noise_types_are_deterministic_and_differ(with_reference):
    ref = _bands(24, 24) if with_reference else None
    state = torch.random.get_rng_state()
    images = {t: noise.noise_image(t, 24, 24, 0.5, 0.0, seed=7, reference=ref) for t in noise.NOISE_TYPES}
    again = {t: noise.noise_image(t, 24, 24, 0.5, 0.0, seed=7, reference=ref) for t in noise.NOISE_TYPES}
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is never used
    for t in noise.NOISE_TYPES:
        assert torch.equal(images[t], again[t]) and images[t].shape == (1, 24, 24, 3)
        assert 0 <= images[t].min() and images[t].max() <= 1
        assert not torch.equal(images[t], noise.noise_image(t, 24, 24, 0.5, 0.0, seed=8, reference=ref))
    flat = [images[t].flatten() for t in noise.NOISE_TYPES]
    assert all(not torch.equal(a, b) for i, a in enumerate(flat) for b in flat[i + 1 :])


def test_noise_strength_zero_keeps_the_reference_and_blur_smooths():
    ref = _bands(16, 16)
    for t in noise.NOISE_TYPES:
        torch.testing.assert_close(noise.noise_image(t, 16, 16, 0.0, 0.0, 1, ref), ref)
    rough = noise.noise_image("dissolve", 32, 32, 1.0, 0.0, 3)
    smooth = noise.noise_image("dissolve", 32, 32, 1.0, 2.0, 3)
    assert smooth.diff(dim=2).abs().mean() < rough.diff(dim=2).abs().mean() / 3
    shuffled = noise.noise_image("shuffle", 16, 16, 1.0, 0.0, 1, ref)
    torch.testing.assert_close(shuffled.flatten(1, 2).sort(dim=1).values, ref.flatten(1, 2).sort(dim=1).values)


@pytest.mark.parametrize("h,w,k,count", [(64, 64, 1, 1), (64, 160, 1, 3), (200, 90, 1, 3), (128, 128, 2, 4),
                                         (100, 250, 2, 10)])
def test_tile_grid_covers_the_image_and_masks_cover_the_latent_once(h, w, k, count):
    grid = tiles.tile_grid(h, w, k)
    assert len(grid) == count
    covered = torch.zeros(h, w)
    for top, left, side in grid:
        assert top >= 0 and left >= 0 and top + side <= h and left + side <= w
        covered[top : top + side, left : left + side] = 1
    assert covered.all()
    for oh, ow in [(h // 8, w // 8), (13, 29), (h, w)]:
        masks = tiles.tile_masks(grid, h, w, oh, ow)
        assert masks.shape == (count, oh, ow)
        assert torch.equal(masks.sum(dim=0), torch.ones(oh, ow))  # every latent position in exactly one tile
        assert (masks.flatten(1).sum(dim=1) > 0).all()  # and every tile has some of the latent
    imgs = tiles.tile_images(_bands(h, w), grid, 16)
    assert imgs.shape == (count, 16, 16, 3)


def test_tile_masks_follow_tile_positions():
    grid = tiles.tile_grid(64, 192, 1)  # three side-by-side squares
    masks = tiles.tile_masks(grid, 64, 192, 8, 24)
    for i in range(3):
        assert masks[i, :, 8 * i : 8 * i + 8].eq(1).all()


def test_enhance_mosaic_places_tile_patches_and_ratio_one_is_the_image():
    g, k, d = 4, 2, 3
    hidden = torch.zeros(k * k, 1 + g * g, d)
    for t in range(k * k):
        hidden[t, 1:] = float(t)  # tile t's patches all equal t
        hidden[t, 0] = 10.0 * t
    mosaic = tiles.mosaic_hidden(hidden, k)
    grid = mosaic[0, 1:, 0].view(g, g)
    assert torch.equal(grid[: g // 2, : g // 2], torch.zeros(2, 2)) and torch.equal(grid[g // 2 :, g // 2 :], torch.full((2, 2), 3.0))
    assert grid[0, g - 1] == 1 and grid[g - 1, 0] == 2 and mosaic[0, 0, 0] == 15.0
    full = torch.randn(1, 1 + g * g, d)
    assert tiles.enhance(full, hidden, k, 1.0) is full
    torch.testing.assert_close(tiles.enhance(full, hidden, k, 0.25), full * 0.25 + mosaic * 0.75)
    assert tiles.enhance_tiles(_bands(30, 50), 3, 16).shape == (9, 16, 16, 3)


@pytest.mark.parametrize("curve,mid", [("linear", 0.5), ("ease_in", 0.25), ("ease_out", 0.75), ("ease_in_out", 0.5)])
def test_schedule_ends_and_midpoints(curve, mid):
    w = schedule.weight_schedule(9, curve, 0.0, 1.0)
    assert len(w) == 9 and w[0] == 0.0 and w[-1] == 1.0 and w[4] == pytest.approx(mid)
    assert all(b >= a for a, b in zip(w, w[1:]))
    w2 = schedule.weight_schedule(12, curve, 1.0, 0.2, start_frame=2, end_frame=10)
    assert w2[:3] == [1.0] * 3 and w2[10:] == [pytest.approx(0.2)] * 2
    assert w2[6] == pytest.approx(1.0 + (0.2 - 1.0) * mid)


def test_custom_schedule_interpolates_and_rejects_bad_entries():
    assert schedule.weight_schedule(5, "custom", custom="0, 1") == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert schedule.weight_schedule(3, "custom", custom="0.4") == [0.4] * 3
    assert schedule.weight_schedule(5, "custom", custom="1, 0, 1") == pytest.approx([1, 0.5, 0, 0.5, 1])
    with pytest.raises(IPAKitError, match="'x' is not a number"):
        schedule.weight_schedule(3, "custom", custom="0, x")
    with pytest.raises(IPAKitError, match="at least 1 frame"):
        schedule.weight_schedule(0)
