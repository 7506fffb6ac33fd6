"""Tasks: how a clean batch becomes a measurement (operator family, its parameters, noise).

Every random draw of a task (masks, drop probabilities, noise) comes either from the given
generator (training: one draw for the whole batch) or, with ``seeds`` (validation/test), from
one generator per sample, so a sample's measurement repeats exactly whatever its batch. The
operator's draws and the noise use different streams of the same seed.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .blur import GaussianBlur
from .ct import CT
from .downsampling import FILTERS, Downsampling
from .inpainting import Inpainting
from .measurement import Measurement
from .mri import MRI
from .noise import gaussian_noise

# mixes a sample's seed into the seed of its operator draws (masks, ...), away from its noise seed
_OPERATOR_STREAM = 0x9E3779B97F4A7C15


def operator_generators(seeds: Tensor, device) -> list[torch.Generator]:
    """One generator per sample for the operator's random draws, seeded from the sample's seed
    but on a stream of its own (the noise uses the seed itself, see :func:`~jfb_ip.physics.noise.randn_like`)."""
    return [torch.Generator(device=device).manual_seed((int(s) * 0x2545F4914F6CDD1D + _OPERATOR_STREAM) % 2**63)
            for s in seeds.tolist()]


def value_or_range(name: str, value, low: float, high: float) -> tuple[float, float]:
    """A float, or a [min, max] range of per-sample values, as (min, max) inside [low, high]."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo = hi = float(value)
    else:
        vals = [float(v) for v in value] if isinstance(value, Sequence) or hasattr(value, "__iter__") else []
        if len(vals) != 2:
            raise ValueError(f"{name} must be a number or a [min, max] range, got {value!r}")
        lo, hi = vals
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name} must lie in [{low}, {high}] (a range as [min, max] with min <= max), got {value!r}")
    return lo, hi


class Task:
    """Base: ``sample(x, generator, seeds) -> Measurement`` on x's device.

    Subclasses give :meth:`operator`; the noise is white Gaussian of std :meth:`noise_sigma`
    (in the units of y) on the entries :meth:`noise_support` marks as measured.

    Class attributes a config check reads (:meth:`check_data`): ``channels`` (what the images
    must have; None: any) and ``suggested_data`` (the data config that fits the task).
    """

    name = "task"
    channels: int | None = None
    suggested_data: str | None = None
    _noise_std: float = 0.0
    # training problems posed per clean image (Willingham et al.'s [4] N; the module repeats the images, see MultiTask)
    problems_per_image: int = 1

    @property
    def noise_std(self) -> float:
        return self._noise_std

    @noise_std.setter
    def noise_std(self, value) -> None:
        """Refused unless a finite number >= 0: a negative std would be used as its absolute value, NaN or inf
        would make every measurement non-finite and every sample count as diverged."""
        try:
            v = math.nan if isinstance(value, (bool, str)) else float(value)
        except (TypeError, ValueError):
            v = math.nan
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{type(self).__name__}: noise_std={value!r} must be a finite number >= 0")
        self._noise_std = v

    def operator(self, x: Tensor, generator=None, seeds: Tensor | None = None):  # pragma: no cover - abstract
        raise NotImplementedError

    def check_data(self, channels: int, image_size: int) -> None:
        """Raise a ValueError naming the ``data.*`` fix when images of this size and channel count
        cannot serve the task (run before anything is built)."""
        if self.channels is not None and channels != self.channels:
            kind = "grayscale" if self.channels == 1 else "RGB" if self.channels == 3 else f"{self.channels} channels"
            alt = f" or use data={self.suggested_data}" if self.suggested_data else ""
            raise ValueError(f"needs data.channels={self.channels} ({kind}) but data.channels={channels}: add "
                             f"data.channels={self.channels}{alt}")

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if self.channels is not None and x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__}: images have {x.shape[1]} channels but the task is set up "
                             f"for {self.channels}; set data.channels={self.channels} or task.channels={x.shape[1]}")

    def noise_sigma(self, x: Tensor) -> float:
        """Standard deviation of the noise in the units of y."""
        return float(self.noise_std)

    def noise_support(self, physics) -> Tensor | None:
        """Where y is measured (1) and so noisy; None: everywhere."""
        return None

    def sample(self, x: Tensor, generator: torch.Generator | None = None, seeds: Tensor | None = None) -> Measurement:
        self.check_input(x)
        physics = self.operator(x, generator, seeds)
        sigma = torch.full((x.shape[0],), self.noise_sigma(x), device=x.device, dtype=x.dtype)
        y = gaussian_noise(physics.A(x), sigma, generator, seeds, self.noise_support(physics))
        return Measurement(y=y, physics=physics, sigma=sigma, x_shape=x.shape)


class Deblur(Task):
    """Gaussian blur + white Gaussian noise (Liu et al. [1] §5.1-5.2, Guan et al. [3] §4).

    Args:
        kernel_size: odd side of the kernel.
        variance: variance of the Gaussian, i.e. its standard deviation is sqrt(variance).
        noise_std: standard deviation of the additive noise (images in [0, 1]).
        padding: boundary of the convolution, 'circular' or 'zeros'.
        channels: expected image channels (None: any).
    """

    name = "deblur"

    def __init__(self, kernel_size: int = 9, variance: float = 5.0, noise_std: float = 0.01,
                 padding: str = "circular", channels: int | None = 3):
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"Deblur: kernel_size must be a positive odd integer, got {kernel_size}")
        if variance <= 0:
            raise ValueError(f"Deblur: variance must be > 0, got {variance}")
        self.kernel_size, self.std, self.noise_std = kernel_size, math.sqrt(variance), noise_std
        self.padding, self.channels = padding, channels

    def operator(self, x: Tensor, generator=None, seeds=None) -> GaussianBlur:
        # one fixed kernel: reuse the operator so its cached norm() survives across batches
        key = (x.device, x.dtype)
        if getattr(self, "_op_key", None) != key:
            self._op = GaussianBlur.from_std(self.kernel_size, self.std, self.padding, device=x.device, dtype=x.dtype)
            self._op_key = key
        return self._op


class Inpaint(Task):
    """Pixel-wise completion (Willingham et al. [4] §III): each pixel is dropped with probability ``p_drop``,
    all its channels together, with a fresh mask per sample; white Gaussian noise of std
    ``noise_std`` on the kept pixels (dropped pixels are measured as 0). Initialised with y, or with its
    normalized-convolution fill (``init="fill"``).

    Args:
        p_drop: drop probability, or a [min, max] range from which each sample draws its own
            (Willingham et al. [4] train on 0.2 to 0.9).
        noise_std: standard deviation of the noise (images in [0, 1]).
        channels: expected image channels (None: any).
        init: the methods' initializer, ``"zeros"`` (y) or ``"fill"`` (normalized convolution,
            :meth:`Inpainting.fill`).
    """

    name = "inpaint"

    def __init__(self, p_drop=0.8, noise_std: float = 0.01, channels: int | None = 3, init: str = "zeros"):
        self.p_range = value_or_range("Inpaint: p_drop", p_drop, 0.0, 1.0)
        self.noise_std, self.channels = float(noise_std), channels
        if init not in Inpainting.INITS:
            raise ValueError(f"Inpaint: init must be one of {Inpainting.INITS}, got {init!r} (task.init=fill)")
        self.init_mode = init

    def _p(self, n: int, generator, device, dtype) -> Tensor:
        lo, hi = self.p_range
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        return lo + (hi - lo) * u

    def operator(self, x: Tensor, generator=None, seeds=None) -> Inpainting:
        if seeds is None:
            p = self._p(x.shape[0], generator, x.device, x.dtype)
            return Inpainting.random(x.shape, p, generator, device=x.device, dtype=x.dtype, init=self.init_mode)
        one = (1, *x.shape[1:])
        masks = [Inpainting.random(one, self._p(1, g, x.device, x.dtype), g, device=x.device, dtype=x.dtype).mask
                 for g in operator_generators(seeds, x.device)]
        return Inpainting(torch.cat(masks), self.init_mode)

    def noise_support(self, physics: Inpainting) -> Tensor:
        return physics.mask


class SuperResolution(Task):
    """Super-resolution (Willingham et al. [4] §III): anti-aliased decimation by ``factor`` (bicubic or
    Gaussian filter, circular boundaries, :class:`Downsampling`) + white Gaussian noise on the
    low-resolution image; initialised by bilinear upsampling of y. Images must be a multiple of
    ``factor`` in size.

    Args:
        factor: integer decimation factor (2, 3, 4).
        filter: 'bicubic' (MATLAB imresize) or 'gaussian'.
        noise_std: standard deviation of the noise (images in [0, 1]).
        init_mode: 'bilinear' (Willingham et al. [4]) or 'bicubic' upsampling of y as the initial guess.
        channels: expected image channels (None: any).
    """

    name = "sr"

    def __init__(self, factor: int = 2, filter: str = "bicubic", noise_std: float = 0.01, init_mode: str = "bilinear",
                 channels: int | None = 3):
        if filter not in FILTERS:
            raise ValueError(f"SuperResolution: filter must be one of {FILTERS}, got {filter!r}")
        self._op = Downsampling(factor, filter, init_mode=init_mode)  # checks factor and init_mode
        self.factor, self.noise_std, self.channels = int(factor), float(noise_std), channels

    def check_data(self, channels: int, image_size: int) -> None:
        super().check_data(channels, image_size)
        if image_size % self.factor:
            raise ValueError(self._size_message(image_size))

    def _size_message(self, size) -> str:
        f = self.factor
        ok = max(f, size - size % f) if isinstance(size, int) else f
        return (f"downsamples by {f}, so the image size must be a multiple of {f}, got {size}: set "
                f"data.image_size to a multiple of {f} (e.g. data.image_size={ok})")

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        H, W = x.shape[-2:]
        if H % self.factor or W % self.factor:
            raise ValueError(f"SuperResolution {self._size_message(H if H % self.factor else W)}")

    def operator(self, x: Tensor, generator=None, seeds=None) -> Downsampling:
        # one fixed filter (moved to x's device/dtype per call): one operator serves every batch,
        # and its norm() is cached per shape/device/dtype
        return self._op


class SingleCoilMRI(Task):
    """Single-coil accelerated MRI (Guan et al. [3] §4): orthonormal 2D FFT keeping random k-space
    columns with a fully sampled centre band (:class:`MRI`); y is the masked k-space as real
    (B, 2C, H, W) channels [real, imag]. The noise is white Gaussian of std ``noise_std`` on the
    real and on the imaginary part of every sampled coefficient (the FFT is orthonormal, so it is
    the image-domain noise level of a fully sampled scan). Initialised with the zero-filled A^T y.

    Args:
        acceleration: sampled fraction of the columns is 1 / acceleration (4 or 8 in Guan et al. [3]).
        center_fraction: width of the always-sampled centre band; None: 0.08 (4x), 0.04 (8x).
        per_sample_masks: True: a fresh mask per sample; False: one mask for the whole dataset,
            drawn once from ``mask_seed`` (the same in training, validation and test).
        mask_seed: seed of the dataset-wide mask (``per_sample_masks=False``).
        noise_std: standard deviation of the noise per real/imaginary part (images in [0, 1]).
        channels: expected image channels (1: magnitude images, as in Guan et al. [3]).
    """

    name = "mri"
    suggested_data = "phantoms"

    def __init__(self, acceleration: float = 4, center_fraction: float | None = None, per_sample_masks: bool = True,
                 mask_seed: int = 0, noise_std: float = 0.01, channels: int | None = 1):
        if not acceleration >= 1:
            raise ValueError(f"SingleCoilMRI: acceleration must be >= 1, got {acceleration}")
        self.acceleration, self.center_fraction = float(acceleration), center_fraction
        self.per_sample_masks, self.mask_seed = bool(per_sample_masks), int(mask_seed)
        self.noise_std, self.channels = float(noise_std), channels
        self._fixed: dict = {}

    def _draw(self, shape, generator, device, dtype) -> Tensor:
        return MRI.random(shape, self.acceleration, self.center_fraction, generator, per_sample=True, device=device,
                          dtype=dtype).mask

    def operator(self, x: Tensor, generator=None, seeds=None) -> MRI:
        one = (1, *x.shape[1:])
        if not self.per_sample_masks:
            key = (x.shape[-1], x.device, x.dtype)
            if key not in self._fixed:  # the operator object is kept, so its cached norm() is too
                g = torch.Generator(device=x.device).manual_seed(self.mask_seed)
                self._fixed[key] = MRI(self._draw(one, g, x.device, x.dtype))
            return self._fixed[key]
        if seeds is None:
            return MRI(self._draw(x.shape, generator, x.device, x.dtype))
        return MRI(torch.cat([self._draw(one, g, x.device, x.dtype) for g in operator_generators(seeds, x.device)]))

    def noise_support(self, physics: MRI) -> Tensor:
        return physics.mask


class ParallelBeamCT(Task):
    """Parallel-beam CT (Guan et al. [3] §4): the Radon transform at ``n_angles`` angles uniformly
    spaced over 180 degrees (:class:`CT`; default: Guan et al.'s [3] 200 angles for a 362-pixel side,
    scaled to the image size) + white Gaussian noise on the sinogram.

    Noise scale: a sinogram bin sums the image along a ray with unit steps, so y grows with the
    image side H. ``noise_std`` is relative to that: the noise std in y is ``noise_std * H``, i.e.
    ``noise_std`` is the noise std of y / H (the mean intensity along a ray through the image, in
    [0, 1] for images in [0, 1]); the same setting means the same difficulty at every size.

    Args:
        n_angles: number of angles over [0, pi); None: :func:`~jfb_ip.physics.ct.default_n_angles`.
        detector_size: detector bins; None: the image diagonal (every pixel seen at every angle).
        init_mode: 'fbp' (filtered back-projection, default: an image on the right scale) or
            'adjoint' (A^T y, Guan et al.'s [3] choice).
        noise_std: noise std relative to the sinogram scale (see above).
        channels: expected image channels (1: grayscale slices).
    """

    name = "ct"
    suggested_data = "phantoms"

    def __init__(self, n_angles: int | None = None, detector_size: int | None = None, init_mode: str = "fbp",
                 noise_std: float = 0.01, channels: int | None = 1):
        if n_angles is not None and not int(n_angles) >= 1:
            raise ValueError(f"ParallelBeamCT: n_angles must be >= 1 or null, got {n_angles}")
        self.n_angles, self.detector_size, self.init_mode = n_angles, detector_size, init_mode
        CT.parallel_beam(8, 1, init_mode=init_mode)  # checks init_mode now, not at the first batch
        self.noise_std, self.channels = float(noise_std), channels
        self._ops: dict = {}

    def operator(self, x: Tensor, generator=None, seeds=None) -> CT:
        key = (tuple(x.shape[-2:]), x.device, x.dtype)
        if key not in self._ops:  # fixed geometry: one operator per size keeps its grids and norm()
            self._ops[key] = CT.parallel_beam(tuple(x.shape[-2:]), self.n_angles, self.detector_size, self.init_mode)
        return self._ops[key]

    def noise_sigma(self, x: Tensor) -> float:
        return self.noise_std * x.shape[-2]
