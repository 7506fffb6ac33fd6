"""task=multitask (Willingham et al. [4] Alg. 1, §III-A) and MixedMeasurement: per-sample degradations in one batch,
reassembled in order, checked against operators rebuilt independently for every sample."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from jfb_ip.lit import ReconstructionModule
from jfb_ip.methods import Wiener, tikhonov
from jfb_ip.physics import Downsampling, GaussianBlur, Inpainting, Measurement, MixedMeasurement, MultiTask
from jfb_ip.physics.tasks import operator_generators

SIZE = 24  # a multiple of every SR factor 1..4

PAPER = dict(blur=dict(sigma=[0.4, 0.8, 1.2, 1.6, 2.0, 2.4], kernel_size=15), inpaint=dict(p_drop=[0.2, 0.5, 0.9]),
             sr=dict(factors=[1, 2, 3, 4]))


def task(**kw) -> MultiTask:
    return MultiTask(**{**PAPER, **kw})


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images so blur/decimation change them visibly
    x = torch.rand(n, 3, SIZE // 4, SIZE // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def independent(t: MultiTask, x: torch.Tensor, seeds: torch.Tensor, meas: MixedMeasurement):
    """Sample i on its own: its draw replayed from its own seed, its operator built from scratch, its y taken
    from the part that holds it -> list of (family, param, sigma, Measurement of one sample)."""
    out = []
    for i, g in enumerate(operator_generators(seeds, x.device)):
        fam, param, sigma = (v.item() for v in t.draw(1, g, x.device, x.dtype))
        family, p = t.families[fam], param
        if family == "blur":
            op = GaussianBlur.from_std(15, p)
        elif family == "inpaint":
            op = Inpainting.random((1, *x.shape[1:]), p, g)  # the same generator, right after the draw
        else:
            op = Downsampling(int(p))
        idx, part = next((idx, m) for idx, m in meas.parts if i in idx.tolist())
        y = part.y[idx.tolist().index(i)][None]
        single = Measurement(y=y, physics=op, sigma=torch.tensor([sigma]), x_shape=x[i:i + 1].shape)
        out.append((family, p, sigma, single))
    return out


def test_one_batch_mixes_families_and_parameters_per_sample():
    t = task()
    x, seeds = images(48), torch.arange(48) + 7
    meas = t.sample(x, seeds=seeds)
    per = independent(t, x, seeds, meas)
    fams = [f for f, *_ in per]
    assert {"blur", "inpaint", "sr"} <= set(fams)
    assert len({p for f, p, *_ in per if f == "sr"}) >= 3 and len({p for f, p, *_ in per if f == "blur"}) >= 3
    assert len({s for *_, s, _ in per}) >= 20  # noise levels differ per sample too
    for i, (family, p, sigma, single) in enumerate(per):
        idx, part = next((idx, m) for idx, m in meas.parts if i in idx.tolist())
        j = idx.tolist().index(i)
        if family == "blur":  # the part's kernel for sample i is a Gaussian of the drawn std sampled on the grid
            k = part.physics.kernel[j].double()
            r = torch.arange(15, dtype=torch.float64) - 7
            w = torch.exp(-r ** 2 / (2 * p ** 2))
            assert torch.allclose(k, torch.outer(w, w) / w.sum() ** 2, atol=1e-6)
        elif family == "inpaint":  # its mask drops about p_drop of the pixels and equals the replayed mask
            m = part.physics.mask[j]
            assert torch.equal(m, single.physics.mask[0])
            assert (1 - m.mean()).item() == pytest.approx(p, abs=0.08)
        else:
            assert part.y.shape[-1] == SIZE // int(p) and part.physics.factor == int(p)
        assert meas.sigma[i].item() == pytest.approx(sigma)
        # the noise that landed in y has the drawn std (estimated where y is measured)
        resid = single.y - single.A(x[i:i + 1])
        if family == "inpaint":
            resid = resid[single.physics.mask.expand_as(resid) > 0]
        if sigma >= 0.05 and resid.numel() > 300:
            assert resid.std().item() == pytest.approx(sigma, rel=0.2)


def test_mixed_measurement_equals_per_sample_computations():
    t = task()
    x, seeds = images(24, seed=1), torch.arange(24) + 100
    meas = t.sample(x, seeds=seeds)
    per = independent(t, x, seeds, meas)
    z = torch.rand_like(x)
    rho = torch.rand(24) + 0.1
    grad, init, shown = meas.grad(z), meas.init(), meas.as_image()
    prox, lmax = meas.prox_data(z, rho), meas.lambda_max()
    for i, (*_, single) in enumerate(per):
        zi = z[i:i + 1]
        assert torch.allclose(grad[i], single.physics.A_adjoint(single.physics.A(zi) - single.y)[0], atol=1e-5)
        assert torch.allclose(init[i], single.init()[0], atol=1e-6)
        assert torch.allclose(shown[i], single.as_image()[0], atol=1e-6)
        # the data prox solves (A^T A + rho I) v = A^T y + rho z for sample i's own rho
        lhs = single.physics.AtA(prox[i:i + 1]) + rho[i] * prox[i:i + 1]
        assert torch.allclose(lhs, single.physics.A_adjoint(single.y) + rho[i] * zi, atol=1e-4)
        assert lmax[i].item() == pytest.approx(single.lambda_max().item(), rel=1e-4)


def test_gradient_flows_back_per_sample():
    """d/dz <w, A^T(Az - y)> = A^T A w per sample: the reassembly is differentiable and keeps the order."""
    t = task()
    x, seeds = images(12, seed=2), torch.arange(12)
    meas = t.sample(x, seeds=seeds)
    per = independent(t, x, seeds, meas)
    z = torch.rand_like(x, requires_grad=True)
    w = torch.rand_like(x)
    (meas.grad(z) * w).sum().backward()
    expect = torch.cat([single.physics.AtA(w[i:i + 1]) for i, (*_, single) in enumerate(per)])
    assert torch.allclose(z.grad, expect, atol=1e-5)


def test_seeded_sampling_repeats_whatever_the_batch():
    t = task()
    x, seeds = images(10, seed=3), torch.arange(10) + 2_000_000
    a = t.sample(x, seeds=seeds)
    b = t.sample(x, seeds=seeds)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    c = t.sample(x[perm], seeds=seeds[perm])
    assert a.labels == b.labels and torch.equal(a.as_image(), b.as_image())
    assert [a.labels[i] for i in perm.tolist()] == c.labels
    assert torch.equal(a.as_image()[perm], c.as_image()) and torch.equal(a.sigma[perm], c.sigma)
    # training draws follow the generator
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert torch.equal(t.sample(x, g(5)).as_image(), t.sample(x, g(5)).as_image())
    assert t.sample(x, g(5)).labels != t.sample(x, g(6)).labels


def test_subset_keeps_the_order_and_the_samples():
    t = task()
    x, seeds = images(16, seed=4), torch.arange(16)
    meas = t.sample(x, seeds=seeds)
    keep = torch.tensor([i % 3 != 0 for i in range(16)])
    sub = meas.subset(keep)
    z = torch.rand_like(x)
    assert sub.batch_size == int(keep.sum()) and sub.labels == [lab for lab, k in zip(meas.labels, keep) if k]
    assert torch.allclose(sub.grad(z[keep]), meas.grad(z)[keep], atol=1e-6)
    assert torch.equal(sub.init(), meas.init()[keep]) and torch.equal(sub.sigma, meas.sigma[keep])


def test_A_and_y_only_where_the_shapes_agree():
    x, seeds = images(8), torch.arange(8)
    same = task(sr=None).sample(x, seeds=seeds)
    z = torch.rand_like(x)
    # A and A^T assembled: <A z, v> = <z, A^T v> (dense adjoint identity over the whole batch)
    v = torch.rand_like(same.y)
    assert (same.A(z) * v).sum().item() == pytest.approx((z * same.A_adjoint(v)).sum().item(), rel=1e-5)
    assert torch.allclose(same.A_adjoint(same.A(z) - same.y), same.grad(z), atol=1e-6)
    mixed = task(blur=None, inpaint=None, sr=dict(factors=[2, 4])).sample(x, seeds=seeds)
    with pytest.raises(ValueError, match="different shapes"):
        mixed.A(z)


def test_wiener_row_works_per_sub_batch():
    t = task()
    x, seeds = images(12, seed=5), torch.arange(12)
    meas = t.sample(x, seeds=seeds)
    per = independent(t, x, seeds, meas)
    out = Wiener(lam=1e-2)(meas).x
    for i, (*_, single) in enumerate(per):
        assert torch.allclose(out[i], tikhonov(single, 1e-2 * single.lambda_max(), "gradient")[0], atol=1e-4)


def test_module_poses_N_problems_per_image_in_training_only():
    t = task(problems_per_image=3)
    module = ReconstructionModule(Wiener(), t, fixed_train_noise=True)
    x, idx = images(4), torch.arange(4)
    module._trainer = SimpleNamespace(training=True, testing=False)
    xr, meas, idr = module.on_after_batch_transfer((x, idx))
    assert torch.equal(xr, x.repeat_interleave(3, 0)) and meas.batch_size == 12
    assert idr.tolist() == list(range(12)) and len(set(meas.labels)) > 6  # each copy its own degradation
    module._trainer = SimpleNamespace(training=False, testing=True)
    xt, meas_t, _ = module.on_after_batch_transfer((x, idx))
    assert torch.equal(xt, x) and meas_t.batch_size == 4


@pytest.mark.parametrize("kw,match", [
    (dict(blur=None, inpaint=None, sr=None), "every family is null"),
    (dict(sr=dict(factors=[2, 0])), "positive integers"),
    (dict(inpaint=dict(p_drop=[1.5])), r"in \[0.0, 1.0\]"),
    (dict(blur=dict(sigma=[1.0], size=3)), r"takes no option\(s\) \['size'\]"),
    (dict(problems_per_image=0), "problems_per_image"),
])
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        task(**kw)


def test_image_size_must_fit_every_factor():
    with pytest.raises(ValueError, match="multiple of 12.*data.image_size=24"):
        task().check_data(3, 30)
    with pytest.raises(ValueError, match="kernel_size"):
        task(sr=None).check_data(3, 12)
    task().check_data(3, 48)


def test_continuous_draws_cover_the_range():
    t = task(continuous=True, inpaint=None, sr=None, blur=dict(sigma=[0.4, 2.4], kernel_size=15))
    _, param, sigma = t.draw(2000, torch.Generator().manual_seed(0), "cpu", torch.float32)
    assert 0.4 <= param.min() < 0.45 and 2.35 < param.max() <= 2.4 and len(param.unique()) > 1000
    assert sigma.max() > 0.24 and sigma.min() < 0.005
