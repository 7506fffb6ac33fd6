"""The dead-leaves generator (jfb_ip.data.synthetic) against independent computations: the radius law's
closed-form CDF, a painter that draws disks one by one bottom first, and the palette the disks must take."""
from __future__ import annotations

import pytest
import torch

from jfb_ip.data import DatasetError, NaturalImages
from jfb_ip.data.natural import photo_palette
from jfb_ip.data.synthetic import dead_leaves, dead_leaves_radii, first_cover


def test_radii_follow_the_power_law_cdf():
    torch.manual_seed(0)
    r_min, r_max, n = 2.0, 40.0, 20000
    r = dead_leaves_radii(n, r_min, r_max).double()
    assert float(r.min()) >= r_min and float(r.max()) <= r_max
    for q in (3.0, 5.0, 10.0, 25.0):
        # P(r <= q) for p(r) ~ r^-3 on [r_min, r_max], integrated by hand
        cdf = (r_min ** -2 - q ** -2) / (r_min ** -2 - r_max ** -2)
        assert abs(float((r <= q).double().mean()) - cdf) < 0.01  # 4 standard errors at n = 20000


@pytest.mark.parametrize("bad", [(0.0, 5.0, 3.0), (5.0, 2.0, 3.0), (1.0, 5.0, 1.0)])
def test_radii_refuse_an_empty_range_or_a_law_without_a_cdf(bad):
    with pytest.raises(ValueError, match="r_min"):
        dead_leaves_radii(4, *bad)


def test_first_cover_matches_painting_disks_bottom_first():
    g = torch.Generator().manual_seed(3)
    size, n = 20, 60
    centres = torch.rand(n, 2, generator=g) * 30 - 5  # some disks lie partly or wholly outside
    radii = torch.rand(n, generator=g) * 6 + 0.5
    painted = torch.full((size, size), -1, dtype=torch.long)
    for k in reversed(range(n)):  # disk 0 is painted last, so it ends on top
        for i in range(size):
            for j in range(size):
                if (i + 0.5 - float(centres[k, 0])) ** 2 + (j + 0.5 - float(centres[k, 1])) ** 2 <= float(radii[k]) ** 2:
                    painted[i, j] = k
    assert torch.equal(first_cover(size, centres, radii), painted)
    assert int((painted < 0).sum()) > 0  # the case with uncovered pixels is exercised
    far = torch.tensor([[100.0, 100.0]])
    assert torch.equal(first_cover(size, far, torch.tensor([3.0])), torch.full((size, size), -1))


def test_dead_leaves_images_take_palette_colours_at_every_pixel():
    torch.manual_seed(0)
    palette = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.6, 0.3], [0.0, 1.0, 0.7]])
    img = dead_leaves(32, palette, r_min=1.0)
    assert img.shape == (3, 32, 32)
    pixels = img.flatten(1).T
    assert all(any(torch.equal(p, palette[:, k]) for k in range(3)) for p in pixels)
    assert len({tuple(p.tolist()) for p in pixels}) > 1  # more than one disk is seen


def test_dead_leaves_crops_take_colours_of_the_training_photos():
    photos = NaturalImages("train", 32, 3, 64)
    palette = photo_palette(photos.images, n=512)
    assert palette.shape == (3, 512)
    # every palette colour is a pixel of some training photo
    pixels = torch.cat([img.flatten(1) for img in photos.images], 1)
    for k in (0, 100, 511):
        assert bool(((pixels - palette[:, k, None]).abs().sum(0) == 0).any())
    torch.manual_seed(0)
    synthetic = NaturalImages("train", 32, 3, 64, dead_leaves=1.0)
    cols = synthetic.palette.T
    for i in range(3):
        img = synthetic[i][0]
        distinct = torch.unique(img.flatten(1).T, dim=0)
        assert all(bool((cols == c).all(1).any()) for c in distinct)  # flat disks of palette colours


def test_natural_images_mix_in_dead_leaves_at_the_asked_fraction(monkeypatch):
    import jfb_ip.data.natural as natural
    monkeypatch.setattr(natural, "draw_dead_leaves", lambda size, palette, r_min: torch.full((3, size, size), -1.0))
    torch.manual_seed(0)
    half = NaturalImages("train", 32, 3, 64, dead_leaves=0.3)
    synthetic = [bool((half[i][0] == -1).all()) for i in range(400)]
    assert abs(sum(synthetic) / 400 - 0.3) < 0.07  # 3 standard errors
    assert not any(bool((NaturalImages("train", 32, 3, 64)[i][0] == -1).all()) for i in range(50))


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_dead_leaves_fraction_is_checked(bad):
    with pytest.raises(DatasetError, match="dead_leaves"):
        NaturalImages("train", 32, 3, 4, dead_leaves=bad)
