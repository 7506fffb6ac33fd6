"""Parallel-beam computed tomography: the Radon transform (Guan et al. [3] §4: "the forward operator
is a Radon transform, and we uniformly select 200 out of 1000 angles"; the data, LoDoPaB-CT,
has 362 x 362 images and 513 detector bins).

Discretisation (unit pixel spacing, the image centre as origin, x along columns, y along rows):
the ray of angle theta and detector offset s is the line {s e_theta + t e_theta^perp} with
e_theta = (cos theta, sin theta), e_theta^perp = (-sin theta, cos theta). The image is sampled
on it by bilinear interpolation (``grid_sample``, zero outside the image) at unit steps in t and
the samples are summed: a Riemann sum of the line integral. Sinograms are (B, C, n_angles, D).

That map is linear with fixed interpolation weights, so its transpose is the scatter of the
same weights: the input gradient of ``grid_sample``. A^T uses exactly that kernel, so the
adjoint is exact to rounding, and both A and A^T are ``autograd.Function``s whose backward is
the other one: differentiable to any order, and A's backward stores no activations.

Where those weights fit in memory (``matrix_nnz``: 48 x 48 images have 0.14 M of them, 128 x 128
about 9 M), they are assembled once into a sparse CSR matrix and its transpose, and A and A^T are
sparse products, 20-125x faster than ``grid_sample`` and the scatter of its backward on CPU
(``python -m jfb_ip.bench.operators``, docs/benchmarks.md): what iterative solvers (TV on CT,
DE-GRAD's gradient steps) spend their time on. Larger operators keep the ``grid_sample`` kernels,
in chunks of angles.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .operator import LinearOperator

INIT_MODES = ("adjoint", "fbp")

# LoDoPaB-CT (the data of Guan et al. [3]): 362 x 362 images measured at 200 of its 1000 angles
_REF_SIDE, _REF_ANGLES, _MIN_ANGLES = 362, 200, 8
# operators whose full sampling grid has at most this many elements keep it between calls
_GRID_CACHE_ELEMENTS = 2**24
# devices with sparse CSR matrix products
_SPARSE_DEVICES = ("cpu", "cuda")


class _Radon(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op):
        ctx.op = op
        return op._project(x)

    @staticmethod
    def backward(ctx, g):
        return _RadonAdjoint.apply(g, ctx.op), None


class _RadonAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, op):
        ctx.op = op
        return op._backproject(y)

    @staticmethod
    def backward(ctx, g):
        return _Radon.apply(g, ctx.op), None


def default_n_angles(image_size: int) -> int:
    """Guan et al.'s [3] 200 angles for LoDoPaB's 362-pixel side, scaled with the side (the number of
    angles a side needs for the same angular sampling grows linearly with it), at least 8."""
    return max(_MIN_ANGLES, round(_REF_ANGLES * image_size / _REF_SIDE))


class CT(LinearOperator):
    """Parallel-beam Radon transform of (B, C, H, W) images into (B, C, n_angles, D) sinograms.

    Args:
        angles: projection angles in radians (a sequence or a 1D tensor).
        image_size: H (square) or (H, W).
        detector_size: number D of unit-spaced detector bins; default ceil(sqrt(H^2 + W^2)),
            so every pixel is seen at every angle (512 for a 362 side; LoDoPaB has 513).
        init_mode: what :meth:`init` returns: 'adjoint' (A^T y, as Guan et al. [3]) or 'fbp'.
        max_elements: bound on the elements of one chunk of sampled rays (B * C * angles * D *
            ray samples); angles are processed in chunks under it to bound memory.
        matrix_nnz: A and A^T are sparse matrix products where the interpolation weights (at most
            4 * angles * D * ray samples) are no more than this, on CPU and CUDA; 0: always the
            ``grid_sample`` kernels.
    """

    def __init__(self, angles: Sequence[float] | Tensor, image_size: int | tuple[int, int],
                 detector_size: int | None = None, init_mode: str = "adjoint", max_elements: int = 2**25,
                 matrix_nnz: int = 2**24):
        if init_mode not in INIT_MODES:
            raise ValueError(f"CT: init_mode must be one of {INIT_MODES}, got {init_mode!r}")
        H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        angles = torch.as_tensor(angles, dtype=torch.float64).reshape(-1)
        if angles.numel() == 0:
            raise ValueError("CT: needs at least one angle")
        diag = math.ceil(math.hypot(H, W))
        # (1, n): a leading 1 so Measurement.subset never mistakes the shared angles for per-sample data
        self.angles = angles.reshape(1, -1)
        self.image_size = (int(H), int(W))
        self.detector_size = int(detector_size) if detector_size is not None else diag
        self.n_ray = diag  # unit steps along t cover the image diagonal at every angle
        self.init_mode = init_mode
        self.max_elements = int(max_elements)
        self.matrix_nnz = int(matrix_nnz)
        self._grid_cache: dict = {}
        self._matrix_cache: dict = {}

    @classmethod
    def parallel_beam(cls, image_size: int | tuple[int, int], n_angles: int | None = None,
                      detector_size: int | None = None, init_mode: str = "adjoint", **kwargs) -> "CT":
        """``n_angles`` angles uniformly spaced over [0, pi); default :func:`default_n_angles`
        of the larger image side (71 for 128, 200 for 362)."""
        side = image_size if isinstance(image_size, int) else max(image_size)
        n = default_n_angles(side) if n_angles is None else int(n_angles)
        angles = torch.arange(n, dtype=torch.float64) * (math.pi / n)
        return cls(angles, image_size, detector_size, init_mode, **kwargs)

    @property
    def n_angles(self) -> int:
        return self.angles.shape[-1]

    # --- geometry -------------------------------------------------------------------------
    def _grid(self, a0: int, a1: int, dtype, device) -> Tensor:
        """grid_sample coordinates (1, (a1-a0)*D, n_ray, 2) of the ray samples of angles a0..a1."""
        D, T = self.detector_size, self.n_ray
        if self.n_angles * D * T * 2 > _GRID_CACHE_ELEMENTS:  # large operators rebuild each chunk
            return self._make_grid(a0, a1, dtype, device)
        key = (dtype, torch.device(device))
        if key not in self._grid_cache:
            self._grid_cache[key] = self._make_grid(0, self.n_angles, dtype, device)
        return self._grid_cache[key][:, a0 * D:a1 * D]

    def _make_grid(self, a0: int, a1: int, dtype, device) -> Tensor:
        H, W = self.image_size
        D, T = self.detector_size, self.n_ray
        theta = self.angles[0, a0:a1].to(device=device, dtype=torch.float64)
        s = torch.arange(D, device=device, dtype=torch.float64) - (D - 1) / 2
        t = torch.arange(T, device=device, dtype=torch.float64) - (T - 1) / 2
        c, sn = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
        px = s[None, :, None] * c - t[None, None, :] * sn  # column offset from the image centre
        py = s[None, :, None] * sn + t[None, None, :] * c  # row offset
        # align_corners=False: pixel i's centre, at offset i - (N-1)/2, has coordinate 2 * offset / N
        return torch.stack([2 * px / W, 2 * py / H], dim=-1).reshape(1, -1, T, 2).to(dtype)

    def _matrices(self, dtype, device) -> tuple[Tensor, Tensor] | None:
        """(A, A^T) as sparse CSR matrices, (n_angles * D, H * W) and its transpose, built once per dtype
        and device; None where they would exceed ``matrix_nnz`` or the device has no CSR products."""
        device = torch.device(device)
        if device.type not in _SPARSE_DEVICES or 4 * self.n_angles * self.detector_size * self.n_ray > self.matrix_nnz:
            return None
        key = (dtype, device)
        if key not in self._matrix_cache:
            m = self._weights()
            with warnings.catch_warnings():  # "sparse CSR support is in beta": products of a fixed matrix only
                warnings.simplefilter("ignore", UserWarning)
                self._matrix_cache[key] = tuple(w.to(dtype=dtype).to_sparse_csr().to(device)
                                                for w in (m, m.t().coalesce()))
        return self._matrix_cache[key]

    def _weights(self) -> Tensor:
        """The bilinear weights of every ray sample, summed along each ray: A as a coalesced float64 COO
        matrix. The same sample positions as :meth:`_make_grid`; grid_sample (align_corners=False) reads
        coordinate 2 * offset / N at pixel offset + (N - 1) / 2, and zero outside the image."""
        H, W = self.image_size
        D, T, n = self.detector_size, self.n_ray, self.n_angles
        g = self._make_grid(0, n, torch.float64, "cpu").reshape(n * D, T, 2)
        ix, iy = (g[..., 0] * W + W - 1) / 2, (g[..., 1] * H + H - 1) / 2
        x0, y0 = ix.floor(), iy.floor()
        fx, fy = ix - x0, iy - y0
        rows = torch.arange(n * D)[:, None].expand(-1, T)
        idx, vals = [], []
        for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            xi, yi = (x0 + dx).long(), (y0 + dy).long()
            keep = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H) & (w != 0)
            idx.append(torch.stack([rows[keep], yi[keep] * W + xi[keep]]))
            vals.append(w[keep])
        return torch.sparse_coo_tensor(torch.cat(idx, 1), torch.cat(vals), (n * D, H * W),
                                       check_invariants=True).coalesce()

    def _chunks(self, batch_channels: int):
        per_angle = max(1, batch_channels * self.detector_size * self.n_ray)
        step = max(1, self.max_elements // per_angle)
        return [(a, min(a + step, self.n_angles)) for a in range(0, self.n_angles, step)]

    def _check_image(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"CT: expected images (B, C, {self.image_size[0]}, {self.image_size[1]}), got "
                             f"{tuple(x.shape)}; build the operator for this size (CT.parallel_beam(image_size))")

    def _check_sinogram(self, y: Tensor) -> None:
        if y.dim() != 4 or tuple(y.shape[-2:]) != (self.n_angles, self.detector_size):
            raise ValueError(f"CT: expected sinograms (B, C, {self.n_angles}, {self.detector_size}), "
                             f"got {tuple(y.shape)}")

    # --- the two kernels (no autograd inside: the Functions above define the derivatives) ---
    def _project(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        mats = self._matrices(x.dtype, x.device)
        if mats is not None:
            return (mats[0] @ x.reshape(B * C, H * W).T).T.reshape(B, C, self.n_angles, self.detector_size)
        xs = x.reshape(1, B * C, H, W)  # the batch rides on channels so one shared grid serves all
        out = []
        for a0, a1 in self._chunks(B * C):
            g = self._grid(a0, a1, x.dtype, x.device)
            samples = F.grid_sample(xs, g, mode="bilinear", padding_mode="zeros", align_corners=False)
            out.append(samples.sum(-1).reshape(B, C, a1 - a0, self.detector_size))
        return torch.cat(out, dim=2)

    def _backproject(self, y: Tensor) -> Tensor:
        B, C = y.shape[:2]
        H, W = self.image_size
        mats = self._matrices(y.dtype, y.device)
        if mats is not None:
            return (mats[1] @ y.reshape(B * C, -1).T).T.reshape(B, C, H, W)
        zeros = y.new_zeros(1, B * C, H, W)  # grid_sampler's backward reads only its shape here
        x = y.new_zeros(1, B * C, H, W)
        for a0, a1 in self._chunks(B * C):
            g = self._grid(a0, a1, y.dtype, y.device)
            # transpose of "sum over t": copy each bin along its ray
            go = y[:, :, a0:a1].reshape(1, B * C, -1, 1).expand(-1, -1, -1, self.n_ray).contiguous()
            gx, _ = torch.ops.aten.grid_sampler_2d_backward(go, zeros, g, 0, 0, False, [True, False])
            x = x + gx
        return x.reshape(B, C, H, W)

    # --- operator interface ------------------------------------------------------------------
    def A(self, x: Tensor) -> Tensor:
        self._check_image(x)
        return _Radon.apply(x, self)

    def A_adjoint(self, y: Tensor) -> Tensor:
        self._check_sinogram(y)
        return _RadonAdjoint.apply(y, self)

    def ramp_filter(self, y: Tensor) -> Tensor:
        """The ramp |nu| (cycles per bin) along the detector axis, from the band-limited spatial
        kernel of Kak & Slaney (h[0] = 1/4, h[n odd] = -1/(pi n)^2, 0 otherwise), with zero
        padding to avoid circular wrap-around; unlike a sampled |nu|, it has no DC error."""
        D = y.shape[-1]
        n_pad = 1 << (2 * D - 1).bit_length()  # linear (not circular) convolution over D bins
        n = torch.fft.fftfreq(n_pad, d=1.0 / n_pad, device=y.device, dtype=y.dtype)
        h = torch.where(n.remainder(2) == 1, -1.0 / (math.pi * n) ** 2, torch.zeros_like(n))
        h[0] = 0.25
        H = torch.fft.rfft(h).real  # h is even, so its spectrum is real
        return torch.fft.irfft(torch.fft.rfft(y, n=n_pad) * H, n=n_pad)[..., :D]

    def fbp(self, y: Tensor) -> Tensor:
        """Filtered back-projection: (pi / n_angles) A^T(ramp * y). With angles uniform over
        [0, pi) it discretises f = int_0^pi (R_theta f * h)(x . e_theta) d theta, h^ = |nu|."""
        self._check_sinogram(y)
        return self.A_adjoint(self.ramp_filter(y)) * (math.pi / self.n_angles)

    def init(self, y: Tensor) -> Tensor:
        """A^T y (Guan et al.'s [3] choice, for consistency across tasks) or the FBP (``init_mode='fbp'``)."""
        return self.fbp(y) if self.init_mode == "fbp" else self.A_adjoint(y)

    def to(self, device=None, dtype=None) -> "CT":
        self._grid_cache, self._matrix_cache = {}, {}
        return super().to(device, dtype)
