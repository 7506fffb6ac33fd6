"""Generated training images: the dead-leaves model (no file, no download).

A dead-leaves image is a stack of opaque disks dropped one on another; what is seen at a pixel is the
topmost disk covering it. With disk radii drawn from the density ``p(r) ~ r^-3`` on ``[r_min, r_max]`` the
images are statistically scale invariant, as natural images are (Lee, Mumford & Huang, "Occlusion models
for natural images", IJCV 2001), and training a restoration network on them generalises to photos
(Achddou, Gousseau & Ladjal, "Synthetic images as a regularity prior for image restoration neural
networks", SSVM 2021). Here they widen the small embedded photo set with edges at every scale,
orientation and contrast; the disks take colours of pixels drawn from the training photos.
"""
from __future__ import annotations

import torch
from torch import Tensor


def dead_leaves_radii(n: int, r_min: float, r_max: float, alpha: float = 3.0) -> Tensor:
    """``n`` radii with density ``p(r) ~ r^-alpha`` on ``[r_min, r_max]`` (alpha > 1), by inverting the CDF
    ``F(r) = (r_min^(1-alpha) - r^(1-alpha)) / (r_min^(1-alpha) - r_max^(1-alpha))`` at uniform draws
    (global RNG)."""
    if not (0 < r_min < r_max) or alpha <= 1:
        raise ValueError(f"dead_leaves_radii: need 0 < r_min < r_max and alpha > 1, got r_min={r_min}, "
                         f"r_max={r_max}, alpha={alpha}")
    a, b = r_min ** (1 - alpha), r_max ** (1 - alpha)
    u = torch.rand(n, dtype=torch.float64)
    return ((a - u * (a - b)) ** (1 / (1 - alpha))).float()


def first_cover(size: int, centres: Tensor, radii: Tensor) -> Tensor:
    """``(size, size)`` index of the first disk (centre ``centres[k]`` as (row, col) in pixels, radius ``radii[k]``)
    that covers each pixel centre, -1 where none does: the visible disk when disk 0 lies on top."""
    coords = torch.arange(size, dtype=centres.dtype, device=centres.device) + 0.5
    # only disks whose bounding box meets the image can be seen (most of the small ones do not)
    seen = ((centres > -radii[:, None]) & (centres < size + radii[:, None])).all(1).nonzero().squeeze(1)
    if not len(seen):
        return torch.full((size, size), -1, dtype=torch.long, device=centres.device)
    c, r = centres[seen], radii[seen]
    inside = ((coords[:, None] - c[:, 0, None, None]) ** 2 + (coords[None, :] - c[:, 1, None, None]) ** 2
              <= r[:, None, None] ** 2)
    # argmax returns the first maximal index: the topmost covering disk
    first = seen[inside.to(torch.uint8).argmax(0)]
    return torch.where(inside.any(0), first, -1)


def dead_leaves(size: int, colors: Tensor, r_min: float = 1.0, r_max: float | None = None,
                chunk: int = 1024, max_disks: int = 1_000_000) -> Tensor:
    """One ``(C, size, size)`` dead-leaves image with the colours of ``colors``, drawn with the global RNG.

    Disks with centres uniform on the image grown by ``r_max`` on every side and radii from
    :func:`dead_leaves_radii` (``r_max``: the image side by default) are drawn top first, ``chunk`` at a time;
    each pixel keeps the first disk that covers it (:func:`first_cover`), so drawing stops once every pixel
    is covered. ``colors`` is a ``(C, K)`` palette: each disk takes one of its columns at random.
    """
    if colors.dim() != 2 or colors.shape[1] < 1:
        raise ValueError(f"dead_leaves: colors must be a (C, K) palette with K >= 1, got {tuple(colors.shape)}")
    r_max = float(size) if r_max is None else float(r_max)
    top = torch.full((size, size), -1, dtype=torch.long)  # index of the disk seen at each pixel
    drawn = 0
    while (top < 0).any():
        if drawn >= max_disks:  # only reachable with a tiny r_min on a huge image
            raise RuntimeError(f"dead_leaves: {max_disks} disks left pixels uncovered; raise r_min")
        centres = torch.rand(chunk, 2) * (size + 2 * r_max) - r_max
        first = first_cover(size, centres, dead_leaves_radii(chunk, r_min, r_max))
        fill = (top < 0) & (first >= 0)
        top[fill] = first[fill] + drawn
        drawn += chunk
    palette = colors[:, torch.randint(colors.shape[1], (drawn,))]
    return palette[:, top]
