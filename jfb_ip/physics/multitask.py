"""Willingham et al.'s [4] multi-task batch: every sample has its own degradation (blur, pixel completion or
super-resolution) and its own noise level, and the methods never see the mixing.

:class:`MixedMeasurement` is the DESIGN's "list of measurements over sub-batches": one ordinary
:class:`Measurement` per operator family/shape, plus the batch positions of its samples. It presents
the methods' interface (``grad``, ``init``, ``prox_data``, ``lambda_max``, ``sigma``, ...) and
reassembles every image-shaped result along the batch dimension in the original order.

:class:`MultiTask` is the task that draws such batches (Alg. 1 and §III-A of Willingham et al. [4]).
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .blur import GaussianBlur
from .downsampling import FILTERS, INIT_MODES, Downsampling
from .inpainting import Inpainting
from .measurement import Measurement
from .noise import gaussian_noise
from .tasks import Task, operator_generators


class MixedMeasurement:
    """Sub-batch measurements behind one batch of ``B`` samples.

    Args:
        parts: ``(index, meas)`` pairs: ``index`` (n_k,) long, the batch positions of ``meas``'s
            samples; together the indices are a permutation of ``0 .. B-1``.
        labels: optional per-sample descriptions (e.g. ``"blur sigma=1.6 noise=0.010"``), kept in batch order.

    Every image-shaped result (``grad``, ``init``, ``prox_data``, ``as_image``) is computed per part
    and put back in batch order, differentiably (a concatenation and one gather). ``A``/``A_adjoint``
    exist only when every part's measurement has the same shape (a mix with super-resolution has
    measurements of several sizes, so there is no single ``y`` tensor); methods that need them per part
    use :meth:`per_part`.
    """

    def __init__(self, parts: Sequence[tuple[Tensor, Measurement]], labels: Sequence[str] | None = None):
        parts = [(idx.reshape(-1).long(), m) for idx, m in parts if idx.numel()]
        if not parts:
            raise ValueError("MixedMeasurement: needs at least one non-empty part")
        for idx, m in parts:
            if idx.numel() != m.batch_size:
                raise ValueError(f"MixedMeasurement: a part has {idx.numel()} indices for {m.batch_size} samples")
        self.parts = parts
        order = torch.cat([idx.to(parts[0][1].y.device) for idx, _ in parts])
        B = order.numel()
        if not torch.equal(order.sort().values, torch.arange(B, device=order.device)):
            raise ValueError(f"MixedMeasurement: the parts' indices must be a permutation of 0..{B - 1}")
        self.order = order
        self.inverse = torch.argsort(order)  # concatenated parts -> batch order
        shapes = {tuple(m.x_shape[1:]) for _, m in parts}
        if len(shapes) != 1:
            raise ValueError(f"MixedMeasurement: every part must have the same image shape, got {sorted(shapes)}")
        self.x_shape = torch.Size((B, *shapes.pop()))
        if labels is not None and len(labels) != B:
            raise ValueError(f"MixedMeasurement: {len(labels)} labels for {B} samples")
        self.labels = list(labels) if labels is not None else None

    # ------------------------------------------------------------------ plumbing
    @property
    def batch_size(self) -> int:
        return self.x_shape[0]

    def _assemble(self, pieces: list[Tensor]) -> Tensor:
        return torch.cat(pieces)[self.inverse.to(pieces[0].device)]

    def _split(self, value, k: int):
        """Part k's share of a per-sample value (a tensor with the batch as first dimension); any
        other value (a float, a 0-d or one-element tensor) is shared by every part."""
        if torch.is_tensor(value) and value.dim() and value.shape[0] == self.batch_size and self.batch_size > 1:
            return value[self.parts[k][0].to(value.device)]
        return value

    def per_part(self, fn: Callable[..., Tensor], *args) -> Tensor:
        """``fn(meas_k, *args_k)`` for every part k, reassembled in batch order; tensor arguments whose
        first dimension is the batch are split per part (images, a per-sample rho or lambda)."""
        return self._assemble([fn(m, *(self._split(a, k) for a in args)) for k, (_, m) in enumerate(self.parts)])

    # ------------------------------------------------------------------ what methods call
    def grad(self, x: Tensor) -> Tensor:
        """A_i^T(A_i x_i - y_i) per sample i (the data-term gradient of eq. (3) of Willingham et al. [4])."""
        return self.per_part(Measurement.grad, x)

    def init(self) -> Tensor:
        """Each part's initial guess ([4]: y for blur and completion, bilinear resizing P(y) for SR)."""
        return self._assemble([m.init() for _, m in self.parts])

    def prox_data(self, v: Tensor, rho) -> Tensor:
        return self.per_part(Measurement.prox_data, v, rho)

    def lambda_max(self) -> Tensor:
        """||A_i||^2 per sample, shape (B,)."""
        return self._assemble([m.lambda_max() for _, m in self.parts])

    def as_image(self) -> Tensor:
        return self._assemble([m.as_image() for _, m in self.parts])

    @property
    def sigma(self) -> Tensor:
        """The noise std of every sample, (B,)."""
        return self._assemble([m.sigma for _, m in self.parts])

    def _same_measurement_shape(self, what: str) -> None:
        shapes = {tuple(m.y.shape[1:]) for _, m in self.parts}
        if len(shapes) > 1:
            raise ValueError(f"MixedMeasurement.{what}: the samples' measurements have different shapes "
                             f"{sorted(shapes)} (super-resolution factors), so they form no single tensor; use "
                             f"grad/prox_data/init, or per_part(fn) to work on each sub-batch")

    @property
    def y(self) -> Tensor:
        """The measurements as one tensor, where every sample's has the same shape."""
        self._same_measurement_shape("y")
        return self._assemble([m.y for _, m in self.parts])

    def A(self, x: Tensor) -> Tensor:
        self._same_measurement_shape("A")
        return self.per_part(Measurement.A, x)

    def A_adjoint(self, y: Tensor) -> Tensor:
        self._same_measurement_shape("A_adjoint")
        return self.per_part(Measurement.A_adjoint, y)

    def subset(self, keep: Tensor) -> "MixedMeasurement":
        """The samples where the boolean mask ``keep`` (B,) is True, in batch order (what the module's
        skip of diverged samples calls)."""
        keep = keep.reshape(-1).bool()
        if keep.numel() != self.batch_size:
            raise ValueError(f"MixedMeasurement.subset: mask of {keep.numel()} for a batch of {self.batch_size}")
        keep_cpu = keep.cpu()
        new_pos = torch.cumsum(keep_cpu.long(), 0) - 1  # position of each kept sample in the smaller batch
        parts = []
        for idx, m in self.parts:
            k = keep_cpu[idx.cpu()]
            if k.any():
                parts.append((new_pos[idx.cpu()[k]].to(idx.device), m if bool(k.all()) else m.subset(k.to(m.y.device))))
        labels = [lab for lab, k in zip(self.labels, keep_cpu.tolist()) if k] if self.labels is not None else None
        return MixedMeasurement(parts, labels)


FAMILIES = ("blur", "inpaint", "sr")
_PAPER = MappingProxyType({})  # a family's default: Willingham et al.'s [4] values for every key
# Willingham et al. [4] §III-A
PAPER_BLUR_SIGMA = (0.4, 0.8, 1.2, 1.6, 2.0, 2.4)
PAPER_P_DROP = (0.2, 0.4, 0.5, 0.6, 0.8, 0.9)
PAPER_SR_FACTORS = (1, 2, 3, 4)


def _floats(name: str, values, low: float, high: float) -> list[float]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"MultiTask: {name} must be a list of values, got {values!r}")
    vals = [float(v) for v in values]
    if not vals or any(not (low <= v <= high) for v in vals):
        raise ValueError(f"MultiTask: {name} must be a non-empty list of values in [{low}, {high}], got {values!r}")
    return vals


def _family(name: str, cfg, allowed: set[str]) -> dict | None:
    if cfg is None:
        return None
    cfg = dict(cfg)
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"MultiTask: {name} takes no option(s) {sorted(unknown)}; it accepts {sorted(allowed)} "
                         f"(or {name}: null to leave the family out)")
    return cfg


class MultiTask(Task):
    """Willingham et al.'s [4] multi-task degradations (Alg. 1, §III-A): each sample draws its own operator and noise.

    A sample first draws a family, then its parameter, then its noise std, all on the device from the
    task's generator (training) or from the sample's own seed (validation/test: the same sample gets the
    same degradation whatever its batch, like every :class:`Task`):

    - ``blur``: Gaussian blur of std ``sigma`` (circular ``kernel_size`` x ``kernel_size`` kernel, one per
      sample), initialised with y;
    - ``inpaint``: pixel-wise completion, each pixel dropped with probability ``p_drop`` (a fresh mask per
      sample, noise only on kept pixels), initialised with y;
    - ``sr``: anti-aliased decimation by an integer ``factor`` (``filter`` bicubic: MATLAB ``imresize``),
      initialised by ``init_mode`` (bilinear) resizing; factor 1 is plain denoising (identity operator).

    The noise std comes from ``{noise_step * s, s = 0 .. noise_levels - 1}`` (paper: 0.005 and 50).
    With ``continuous`` false (Willingham et al. [4]) blur stds, drop probabilities and noise stds are drawn from the
    listed values; with true, uniformly from [min, max] of each list (the paper's "0.4..2.4" read as a range).

    Args:
        blur: ``{sigma: [...], kernel_size, padding, weight}`` (a key left out: the value of [4]; the default
            ``{}`` is the paper's blur) or None to leave blur out.
        inpaint: ``{p_drop: [...], weight}`` or None.
        sr: ``{factors: [...], filter, init_mode, weight}`` or None.
            ``weight`` (every family): the family's relative frequency; None: its number of listed values, so
            the draw is uniform over the listed degradations ([4]: (A_i, sigma_i) picked from A x Sigma).
        noise_step, noise_levels: the noise grid.
        continuous: see above.
        problems_per_image: N of Alg. 1: in training every clean image is repeated N times, each copy with its
            own degradation, and the loss is the mean over the N problems (the module repeats the images;
            validation and test pose one problem per image).
        channels: expected image channels (None: any).
    """

    name = "multitask"

    def __init__(self, blur: Mapping[str, Any] | None = _PAPER, inpaint: Mapping[str, Any] | None = _PAPER,
                 sr: Mapping[str, Any] | None = _PAPER, noise_step: float = 0.005, noise_levels: int = 50,
                 continuous: bool = False, problems_per_image: int = 5, channels: int | None = 3):
        self.blur = _family("blur", blur, {"sigma", "kernel_size", "padding", "weight"})
        self.inpaint = _family("inpaint", inpaint, {"p_drop", "weight"})
        self.sr = _family("sr", sr, {"factors", "filter", "init_mode", "weight"})
        self.continuous = bool(continuous)
        values: dict[str, list[float]] = {}
        if self.blur is not None:
            values["blur"] = _floats("blur.sigma", self.blur.get("sigma", PAPER_BLUR_SIGMA), 1e-3, 1e3)
            k = int(self.blur.get("kernel_size", 15))
            if k < 1 or k % 2 == 0:
                raise ValueError(f"MultiTask: blur.kernel_size must be a positive odd integer, got {k}")
            self.kernel_size, self.padding = k, self.blur.get("padding", "circular")
            GaussianBlur(torch.ones(1, 1, 1), self.padding)  # checks the padding name now
        if self.inpaint is not None:
            values["inpaint"] = _floats("inpaint.p_drop", self.inpaint.get("p_drop", PAPER_P_DROP), 0.0, 1.0)
        if self.sr is not None:
            factors = self.sr.get("factors", PAPER_SR_FACTORS)
            if isinstance(factors, (str, bytes)) or not hasattr(factors, "__iter__") or not list(factors) or any(
                    isinstance(f, bool) or int(f) != f or f < 1 for f in factors):
                raise ValueError(f"MultiTask: sr.factors must be a non-empty list of positive integers, got "
                                 f"{factors!r}")
            values["sr"] = [float(int(f)) for f in factors]
            filt, init_mode = self.sr.get("filter", "bicubic"), self.sr.get("init_mode", "bilinear")
            if filt not in FILTERS or init_mode not in INIT_MODES:
                raise ValueError(f"MultiTask: sr.filter must be one of {FILTERS} and sr.init_mode one of "
                                 f"{INIT_MODES}, got {filt!r}, {init_mode!r}")
            self._sr_ops = {int(f): Downsampling(int(f), filt, init_mode=init_mode) for f in set(values["sr"])}
        if not values:
            raise ValueError("MultiTask: every family is null; keep at least one of blur, inpaint, sr")
        self.families = [f for f in FAMILIES if f in values]
        self.values = values
        weights = []
        for f in self.families:
            w = getattr(self, f).get("weight")
            w = float(len(values[f])) if w is None else float(w)
            if not w >= 0:
                raise ValueError(f"MultiTask: {f}.weight must be >= 0 (or null), got {w}")
            weights.append(w)
        if sum(weights) <= 0:
            raise ValueError(f"MultiTask: the family weights {weights} sum to 0; give one family a positive weight")
        self.weights = torch.tensor(weights, dtype=torch.float64)
        if not (isinstance(noise_levels, int) and noise_levels >= 1) or not noise_step >= 0:
            raise ValueError(f"MultiTask: noise_levels must be an integer >= 1 and noise_step >= 0, got "
                             f"{noise_levels!r}, {noise_step!r}")
        self.noise_grid = [noise_step * s for s in range(noise_levels)]
        if not (isinstance(problems_per_image, int) and problems_per_image >= 1):
            raise ValueError(f"MultiTask: problems_per_image must be an integer >= 1, got {problems_per_image!r}")
        self.problems_per_image = problems_per_image
        self.channels = channels

    # ------------------------------------------------------------------ config-time checks
    @property
    def size_multiple(self) -> int:
        """Images must be a multiple of every SR factor (the least common multiple)."""
        return math.lcm(*[int(f) for f in self.values["sr"]]) if "sr" in self.values else 1

    def _size_problem(self, size: int) -> str | None:
        m = self.size_multiple
        if size % m:
            ok = max(m, size - size % m)
            return (f"draws super-resolution factors {sorted({int(f) for f in self.values['sr']})}, so the image size "
                    f"must be a multiple of {m}, got {size}: set data.image_size={ok} (or fewer task.sr.factors)")
        if "blur" in self.values and size < self.kernel_size:
            return (f"blurs with a {self.kernel_size}x{self.kernel_size} kernel, larger than the {size}-pixel images: "
                    f"set task.blur.kernel_size <= {size} or a larger data.image_size")
        return None

    def check_data(self, channels: int, image_size: int) -> None:
        super().check_data(channels, image_size)
        problem = self._size_problem(int(image_size))
        if problem:
            raise ValueError(problem)

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        for size in x.shape[-2:]:
            problem = self._size_problem(int(size))
            if problem:
                raise ValueError(f"MultiTask {problem}")

    # ------------------------------------------------------------------ draws
    @staticmethod
    def _pick(values: list[float], u: Tensor, continuous: bool) -> Tensor:
        """u in [0, 1) -> one of ``values`` (uniform), or uniform in [min, max] when continuous."""
        v = torch.tensor(values, dtype=u.dtype, device=u.device)
        if continuous:
            return v.min() + (v.max() - v.min()) * u
        return v[(u * len(values)).long().clamp_max(len(values) - 1)]

    def draw(self, n: int, generator: torch.Generator | None, device, dtype) -> tuple[Tensor, Tensor, Tensor]:
        """(family index into ``self.families``, parameter, noise std), each (n,), for n samples."""
        fam = torch.multinomial(self.weights.to(device=device, dtype=torch.float32), n, replacement=True,
                                generator=generator)
        u = torch.rand(2, n, generator=generator, device=device, dtype=torch.float64)
        param = torch.zeros(n, dtype=torch.float64, device=device)
        for k, f in enumerate(self.families):
            # SR factors are integers: one of the list in either mode
            picked = self._pick(self.values[f], u[0], self.continuous and f != "sr")
            param = torch.where(fam == k, picked, param)
        sigma = self._pick(self.noise_grid, u[1], self.continuous)
        return fam, param.to(dtype), sigma.to(dtype)

    def sample(self, x: Tensor, generator: torch.Generator | None = None, seeds: Tensor | None = None):
        """A :class:`MixedMeasurement` of x: one sub-batch per family (per factor for SR)."""
        self.check_input(x)
        B, device, dtype = x.shape[0], x.device, x.dtype
        if seeds is None:
            gens = None
            fam, param, sigma = self.draw(B, generator, device, dtype)
        else:
            seeds = seeds.reshape(-1)
            if seeds.numel() != B:
                raise ValueError(f"MultiTask.sample: {seeds.numel()} seeds for a batch of {B}")
            gens = operator_generators(seeds, device)
            draws = [self.draw(1, g, device, dtype) for g in gens]
            fam, param, sigma = (torch.cat([d[j] for d in draws]) for j in range(3))
        parts, labels = [], [""] * B
        for k, f in enumerate(self.families):
            groups = [(fam == k, None)] if f != "sr" else \
                [((fam == k) & (param == float(fac)), fac) for fac in sorted(self._sr_ops)]
            for sel, fac in groups:
                idx = torch.nonzero(sel).reshape(-1)
                if not idx.numel():
                    continue
                xs, ps, ss = x[idx], param[idx], sigma[idx]
                sub_seeds = seeds[idx.cpu()] if seeds is not None else None
                physics, support = self._operator(f, fac, xs, ps, generator,
                                                  [gens[i] for i in idx.tolist()] if gens else None)
                y = gaussian_noise(physics.A(xs), ss, generator, sub_seeds, support)
                parts.append((idx, Measurement(y=y, physics=physics, sigma=ss, x_shape=xs.shape)))
                for i, p, s in zip(idx.tolist(), ps.tolist(), ss.tolist()):
                    labels[i] = self._label(f, p, s)
        return MixedMeasurement(parts, labels)

    def _operator(self, family: str, factor, xs: Tensor, params: Tensor, generator, gens):
        if family == "blur":
            return GaussianBlur.from_std(self.kernel_size, params, self.padding, batch=xs.shape[0], device=xs.device,
                                         dtype=xs.dtype), None
        if family == "inpaint":
            if gens is None:
                op = Inpainting.random(xs.shape, params, generator, device=xs.device, dtype=xs.dtype)
            else:  # each sample's mask from its own generator, after its family/parameter draws
                one = (1, *xs.shape[1:])
                op = Inpainting(torch.cat([Inpainting.random(one, p, g, device=xs.device, dtype=xs.dtype).mask
                                           for p, g in zip(params.reshape(-1, 1), gens)]))
            return op, op.mask
        return self._sr_ops[factor], None

    @staticmethod
    def _label(family: str, param: float, sigma: float) -> str:
        what = {"blur": f"blur sigma={param:.2f}", "inpaint": f"inpaint p_drop={param:.2f}",
                "sr": f"sr x{int(param)}"}[family]
        return f"{what} noise={sigma:.3f}"
