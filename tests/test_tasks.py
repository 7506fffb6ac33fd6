"""Tasks beyond deblurring (inpainting, super-resolution, single-coil MRI, parallel-beam CT):
measurement shapes, noise levels estimated from y - A x, per-sample seeded masks, the config
checks, the Tikhonov baseline against a dense solve, phantoms, and every task end to end."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, compose_cfg, for_task
from jfb_ip.data import Phantoms
from jfb_ip.data.images import DatasetError
from jfb_ip.lit.errors import ConfigError
from jfb_ip.lit.run import evaluate, train
from jfb_ip.methods import Wiener, tikhonov
from jfb_ip.physics import Deblur, Inpaint, Measurement, ParallelBeamCT, SingleCoilMRI, SuperResolution
from jfb_ip.physics.ct import default_n_angles

torch.set_num_threads(1)


def tasks():
    return {"inpaint": Inpaint(0.8, noise_std=0.05, channels=1), "sr2": SuperResolution(2, noise_std=0.05, channels=1),
            "sr4": SuperResolution(4, noise_std=0.05, channels=1), "mri4x": SingleCoilMRI(4, noise_std=0.05),
            "mri8x": SingleCoilMRI(8, noise_std=0.05), "ct": ParallelBeamCT(noise_std=0.05)}


@pytest.mark.parametrize("name", ["inpaint", "sr2", "sr4", "mri4x", "mri8x", "ct"])
def test_measurement_shape_and_noise_level(name):
    """The noise std estimated from y - A x (on the measured entries) over a big image is the configured one."""
    task = tasks()[name]
    H = 128
    x = torch.rand(2, 1, H, H, generator=torch.Generator().manual_seed(0))
    meas = task.sample(x, seeds=torch.tensor([5, 6]))
    want_shape = {"inpaint": (2, 1, H, H), "sr2": (2, 1, H // 2, H // 2), "sr4": (2, 1, H // 4, H // 4),
                  "mri4x": (2, 2, H, H), "mri8x": (2, 2, H, H),
                  "ct": (2, 1, default_n_angles(H), math.ceil(math.sqrt(2) * H))}[name]
    assert tuple(meas.y.shape) == want_shape
    assert meas.init().shape == x.shape and meas.as_image().shape == x.shape
    r = meas.y - meas.physics.A(x)
    if name == "inpaint":  # dropped pixels are measured as exactly 0, without noise
        kept = meas.physics.mask.expand_as(r).bool()
        assert (meas.y[~kept] == 0).all()
        r = r[kept]
    elif name.startswith("mri"):  # unsampled k-space columns hold exactly 0
        sampled = meas.physics.mask.expand_as(r).bool()
        assert (meas.y[~sampled] == 0).all()
        r = r[sampled]
    expected = 0.05 * H if name == "ct" else 0.05  # CT: relative to the image side (see ParallelBeamCT)
    assert r.numel() > 2000
    assert r.std().item() == pytest.approx(expected, rel=0.1)
    assert meas.sigma.tolist() == pytest.approx([expected] * 2)


def test_inpainting_masks_per_sample_seeded_and_at_the_drop_rate():
    task = Inpaint(p_drop=0.8, channels=3)
    x = torch.rand(4, 3, 64, 64)
    a = task.sample(x, seeds=torch.arange(4))
    m = a.physics.mask
    assert m.shape == (4, 1, 64, 64)  # one mask per sample, shared by the colour channels
    assert ((a.y == 0).all(1) == (m[:, 0] == 0)).all()
    assert all(not torch.equal(m[i], m[j]) for i in range(4) for j in range(i))
    assert (1 - m.mean((1, 2, 3))).tolist() == pytest.approx([0.8] * 4, abs=0.03)
    # the same seeds give the same masks and noise, whatever the batch order; other seeds others
    b = task.sample(x[[2, 0, 3, 1]], seeds=torch.tensor([2, 0, 3, 1]))
    assert torch.equal(b.physics.mask, m[[2, 0, 3, 1]]) and torch.equal(b.y, a.y[[2, 0, 3, 1]])
    assert not torch.equal(task.sample(x, seeds=torch.arange(4) + 100).physics.mask, m)
    # training draws (no seeds) differ from call to call and across the batch
    t1, t2 = task.sample(x).physics.mask, task.sample(x).physics.mask
    assert not torch.equal(t1, t2) and not torch.equal(t1[0], t1[1])


def test_inpainting_drop_probability_range_per_sample():
    task = Inpaint(p_drop=[0.2, 0.9], channels=1)
    drop = 1 - task.sample(torch.rand(64, 1, 48, 48), seeds=torch.arange(64)).physics.mask.mean((1, 2, 3))
    assert drop.min() > 0.15 and drop.max() < 0.95 and drop.std() > 0.1  # spread over the range
    for bad in (1.5, [0.9, 0.2], [0.1, 0.2, 0.3]):
        with pytest.raises(ValueError, match="p_drop"):
            Inpaint(p_drop=bad)


def test_mri_masks_per_sample_or_fixed_per_dataset():
    x = torch.rand(6, 1, 32, 40)
    task = SingleCoilMRI(acceleration=4)
    m = task.sample(x, seeds=torch.arange(6)).physics.mask
    assert m.shape == (6, 1, 1, 40) and (m.sum((1, 2, 3)) == 10).all()  # W / acceleration columns each
    assert all(not torch.equal(m[i], m[j]) for i in range(6) for j in range(i))
    assert torch.equal(task.sample(x[:3], seeds=torch.arange(3)).physics.mask, m[:3])
    fixed = SingleCoilMRI(acceleration=8, per_sample_masks=False)
    f1 = fixed.sample(x, seeds=torch.arange(6)).physics.mask
    f2 = fixed.sample(x).physics.mask  # a training batch uses the same dataset-wide mask
    assert f1.shape == (1, 1, 1, 40) and torch.equal(f1, f2) and int(f1.sum()) == 5
    assert not torch.equal(SingleCoilMRI(8, per_sample_masks=False, mask_seed=1).sample(x).physics.mask, f1)


def test_mask_draws_and_noise_use_separate_streams():
    """Sample i's mask and noise come from one seed but not from the same random numbers: the
    mask is not what a generator seeded with the noise seed gives in the same draw order."""
    from jfb_ip.physics import Inpainting

    x = torch.zeros(1, 1, 64, 64)
    meas = Inpaint(p_drop=0.5, noise_std=1.0, channels=1).sample(x, seeds=torch.tensor([7]))
    g = torch.Generator().manual_seed(7)
    p = torch.rand(1, generator=g)  # Inpaint draws the sample's drop probability first
    naive = Inpainting.random((1, 1, 64, 64), 0.5 + 0 * p, g).mask
    assert (naive != meas.physics.mask).float().mean() > 0.3
    assert meas.y[meas.physics.mask.bool()].std().item() == pytest.approx(1.0, rel=0.1)


def test_sr_needs_a_size_divisible_by_the_factor():
    with pytest.raises(ValueError, match=r"data\.image_size"):
        SuperResolution(4, channels=1).sample(torch.rand(1, 1, 30, 30))
    with pytest.raises(ValueError, match=r"data.image_size=28"):
        SuperResolution(4, channels=1).check_data(1, 30)


def test_ct_task_operator_follows_the_image_size():
    task = ParallelBeamCT(n_angles=12)
    a = task.sample(torch.rand(2, 1, 20, 20), seeds=torch.arange(2))
    b = task.sample(torch.rand(2, 1, 24, 24), seeds=torch.arange(2))
    assert a.y.shape == (2, 1, 12, 29) and b.y.shape == (2, 1, 12, 34)
    assert task.operator(torch.rand(1, 1, 20, 20)) is a.physics  # one operator per size: norm() cached
    # FBP init is the image scale; the adjoint (Guan et al. [3]) is not
    x = torch.rand(2, 1, 24, 24)
    fbp = ParallelBeamCT(init_mode="fbp", noise_std=0).sample(x).init()
    adj = ParallelBeamCT(init_mode="adjoint", noise_std=0).sample(x).init()
    assert (fbp - x).abs().mean() < 0.2 < (adj - x).abs().mean()


@pytest.mark.integration
def test_impossible_task_data_combination_fails_at_config_time_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "task=ct", "data=natural", "logger=none",
                        f"hydra.run.dir={tmp_path}/out"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert ("error: task=ct needs data.channels=1 (grayscale) but data.channels=3: add data.channels=1 or use "
            "data=phantoms") in r.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()
    with pytest.raises(ConfigError, match=r"task=sr4 .*multiple of 4.*data\.image_size=20"):
        train(compose_cfg("train", for_task(TINY, "sr4") + ["task=sr4", "data.image_size=22"], tmp_path))
    with pytest.raises(ConfigError, match=r"task=mri8x needs data\.channels=1"):
        train(compose_cfg("train", ["logger=none", "task=mri8x", "data=folder", "data.root=x"], tmp_path))


def test_ct_and_mri_pick_the_phantoms_unless_data_is_given(tmp_path):
    for task in ("ct", "mri4x", "mri8x"):
        cfg = compose_cfg("train", [f"task={task}"], tmp_path)
        assert cfg.data.dataset._target_ == "jfb_ip.data.Phantoms" and cfg.data.channels == 1
    cfg = compose_cfg("train", ["task=ct", "data=folder", "data.channels=1"], tmp_path)
    assert cfg.data.dataset._target_ == "jfb_ip.data.ImageFolder"
    assert compose_cfg("train", ["task=inpaint"], tmp_path).data.dataset._target_ == "jfb_ip.data.NaturalImages"


@pytest.mark.parametrize("name", ["sr2", "mri4x", "ct"])
def test_tikhonov_baseline_matches_a_dense_solve(name):
    """Wiener's lambda is relative to ||A||^2; the CG solve equals the dense normal equations."""
    from jfb_ip.physics import laplacian
    from test_physics_operators import dense

    task = {"sr2": SuperResolution(2, channels=1), "mri4x": SingleCoilMRI(4), "ct": ParallelBeamCT(n_angles=6)}[name]
    shape = (1, 1, 8, 8)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    meas = task.sample(x, seeds=torch.tensor([3]))
    meas = Measurement(meas.y, meas.physics, meas.sigma, meas.x_shape)
    A = dense(meas.physics.A, shape)
    L = torch.linalg.matrix_norm(A, ord=2) ** 2
    lam = 0.01
    PtP = dense(lambda v: laplacian(v, "replicate"), shape)
    x_ref = torch.linalg.solve(A.T @ A + lam * L * PtP, A.T @ meas.y.flatten())
    assert meas.lambda_max().item() == pytest.approx(L.item(), rel=1e-4)
    x_hat = tikhonov(meas, lam * meas.lambda_max(), "gradient", n_iter=2000, tol=1e-12)
    assert torch.allclose(x_hat.flatten(), x_ref, atol=1e-8)
    # the baseline row: the same solve at its own CG tolerance
    x_row = Wiener(lam=lam).double()(meas).x
    assert torch.allclose(x_row.flatten(), x_ref, atol=2e-3)


def test_phantoms_fixed_eval_sets_varied_train_draws():
    val = Phantoms("val", 32, eval_samples=3)
    again, test = Phantoms("val", 32, eval_samples=3), Phantoms("test", 32, eval_samples=3)
    assert all(torch.equal(val[i][0], again[i][0]) for i in range(3))
    assert not any(torch.equal(val[i][0], test[j][0]) for i in range(3) for j in range(3))
    x = val[0][0]
    assert x.shape == (1, 32, 32) and x.min() >= 0 and x.max() <= 1
    train_ds = Phantoms("train", 32, train_samples=4)
    assert not torch.equal(train_ds[0][0], train_ds[0][0])
    # not flat ellipses: many grey levels, and texture (non-zero local variation) inside the body
    big = Phantoms("test", 96, eval_samples=1)[0][0]
    inside = big[big > 0.05]
    assert inside.unique().numel() > 500
    assert (big[:, 1:] - big[:, :-1]).abs()[big[:, 1:] > 0.05].median() > 1e-3
    assert Phantoms("val", 16, channels=3, eval_samples=1)[0][0].shape == (3, 16, 16)


def test_phantom_shapes_against_closed_forms():
    """The anatomy style's blob with no wobble is the ellipse, and its curve with no amplitude is the straight band
    of the closed-form distance |v| < width / 2, |u| < length / 2."""
    from jfb_ip.data.phantoms import _blob, _curve, _ellipse
    t = (torch.arange(64, dtype=torch.float64) + 0.5) / 64 * 2 - 1
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    still = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    assert torch.allclose(_blob(xx, yy, 0.1, -0.2, 0.5, 0.3, 0.7, 0.05, still),
                          _ellipse(xx, yy, 0.1, -0.2, 0.5, 0.3, 0.7, 0.05))
    wobbly = _blob(xx, yy, 0.1, -0.2, 0.5, 0.3, 0.7, 0.05, torch.tensor([[0.12, 0.0]]))
    assert (wobbly - _ellipse(xx, yy, 0.1, -0.2, 0.5, 0.3, 0.7, 0.05)).abs().max() > 0.5
    band = _curve(xx, yy, 0.0, 0.0, 1.0, 0.2, 0.0, 0.0, 5.0, 0.0, edge=1e-9)
    assert torch.equal(band > 0.5, (yy.abs() < 0.1) & (xx.abs() < 0.5))


def test_phantom_styles():
    """anatomy: close-ups whose body reaches the frame, and organs of many grey levels; ellipses never reach it."""
    def border(x):
        return torch.cat([x[0, 0], x[0, -1], x[0, :, 0], x[0, :, -1]]).max()

    anatomy = [Phantoms("test", 48, eval_samples=24)[i][0] for i in range(24)]
    ellipses = [Phantoms("test", 48, eval_samples=24, style="ellipses")[i][0] for i in range(24)]
    assert max(border(x) for x in ellipses) < 0.05
    assert sum(border(x) > 0.1 for x in anatomy) >= 4
    assert all(0 <= x.min() and x.max() <= 1 for x in anatomy)
    with pytest.raises(DatasetError, match="style must be one of"):
        Phantoms("test", 16, style="cartoon")


@pytest.mark.integration
def test_every_task_multirun_degrad_and_lu_dncnn(tmp_path):
    """method=degrad,lu_dncnn x task=inpaint,sr2,mri4x,ct with fast_dev_run: each job writes
    metrics.json with finite PSNR in every row (the measurement row scores the initializer)."""
    r = subprocess.run([sys.executable, "train.py", "-m", "method=degrad,lu_dncnn", "task=inpaint,sr2,mri4x,ct",
                        "debug=fast_dev_run", "logger=none", "data.image_size=16", "data.batch_size=4",
                        "data.eval_batch_size=4", "method.net.depth=3", "method.net.width=8",
                        f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/metrics.json"))]
    got = sorted((m["config"]["method"]["_target_"].rsplit(".", 1)[1], m["config"]["task"]["_target_"].rsplit(".")[-1])
                 for m in runs)
    assert got == sorted((m, t) for m in ("DEGRAD", "LUDnCNN")
                         for t in ("Inpaint", "SuperResolution", "SingleCoilMRI", "ParallelBeamCT"))
    for m in runs:
        assert m["test"]["n_images"] == 4
        assert all(math.isfinite(m["test"][row]["psnr"]) for row in ("measurement", "wiener", "model"))
    assert len(list(tmp_path.glob("*/examples.png"))) == 8


@pytest.mark.integration
def test_every_other_backward_mode_trains_on_super_resolution(tmp_path):
    """Every backward mode on a task other than deblurring (implicit: on MRI, the next test). Two real
    steps each; inject=none so the network (not only the anchor's gate) gets a gradient, and the modes give
    different models."""
    overrides = [o for o in for_task(TINY, "sr2") if not o.startswith("logger=")] + ["method.inject=none"]
    r = subprocess.run([sys.executable, "train.py", "-m", "task=sr2", "backward=jfb,neumann,unroll,phantom", *overrides,
                        "logger=none", f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/metrics.json"))]
    assert sorted(m["config"]["backward"]["mode"] for m in runs) == ["jfb", "neumann", "phantom", "unroll"]
    assert all(m["config"]["task"]["_target_"].endswith("SuperResolution") and m["train"]["steps"] == 2 for m in runs)
    psnr = {m["config"]["backward"]["mode"]: m["test"]["model"]["psnr"] for m in runs}
    assert all(math.isfinite(v) for v in psnr.values()) and psnr["jfb"] != psnr["unroll"]


def test_implicit_backward_on_mri_then_evaluate_on_gray_folder(tmp_path, image_folder):
    """A non-deblur task trained with backward=implicit, its checkpoint evaluated on real-slice-like
    grayscale images from a folder (data=folder data.channels=1)."""
    overrides = for_task(TINY, "mri4x") + ["task=mri4x", "backward=implicit"]
    out = train(compose_cfg("train", overrides, tmp_path / "run"))
    assert out["config"]["backward"]["mode"] == "implicit" and out["train"]["steps"] == 2
    assert math.isfinite(out["test"]["model"]["psnr"])
    cfg = compose_cfg("evaluate", [f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "debug=smoke",
                                   "data=folder", f"data.root={image_folder}", "data.image_size=16",
                                   "data.channels=1", "data.num_workers=0"], tmp_path / "eval")
    res = evaluate(cfg)
    assert res["test"]["n_images"] == 3 and math.isfinite(res["test"]["model"]["psnr"])
    assert (tmp_path / "eval" / "examples.png").is_file()


def test_deblur_measurements_unchanged_by_the_task_refactor():
    """Deblur still draws y = A x + sigma * randn(seed), one generator seeded per sample."""
    task = Deblur(channels=1)
    x = torch.rand(2, 1, 16, 16)
    seeds = torch.tensor([3, 9])
    noise = torch.stack([torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (3, 9)])
    ref = task.operator(x).A(x) + 0.01 * noise
    assert torch.equal(task.sample(x, seeds=seeds).y, ref)


def test_degrad_prox_data_step_trains_from_the_config(tmp_path):
    """method.data_step=prox from the command line reaches DEGRAD and trains end to end on a null-space task."""
    out = train(compose_cfg("train", for_task(TINY, "inpaint") + ["task=inpaint", "method.data_step=prox"], tmp_path))
    assert out["config"]["method"]["data_step"] == "prox" and out["train"]["steps"] == 2
    assert math.isfinite(out["test"]["model"]["psnr"])
    with pytest.raises(Exception, match="data_step=prox takes no step size"):
        train(compose_cfg("train", for_task(TINY, "inpaint") + ["task=inpaint", "method.data_step=prox",
                                                                "method.eta=0.5"], tmp_path / "bad"))


@pytest.mark.parametrize("inject,initializer", [("input", "task"), ("anchor", "wiener")])
def test_degrad_inject_trains_from_the_config(tmp_path, inject, initializer):
    """method.inject doubles the network's input channels through the config's resolver and trains end to end on
    a task whose measurement is not an image (SR: z0 is the bilinear upsampling, or the Wiener estimate)."""
    cfg = compose_cfg("train", for_task(TINY, "sr2") + ["task=sr2", f"method.inject={inject}",
                                                        f"method.initializer={initializer}"], tmp_path)
    assert cfg.method.net.in_channels == 2 * cfg.data.channels and cfg.method.net.out_channels == cfg.data.channels
    out = train(cfg)
    assert out["config"]["method"]["inject"] == inject and out["train"]["steps"] == 2
    assert math.isfinite(out["test"]["model"]["psnr"])
    if initializer == "wiener":  # tuned on the first training batch, saved with the method
        sd = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        from jfb_ip.methods.classical import default_lambda_grid

        lam = float(sd["method.wiener.lam"])
        assert bool(sd["method.wiener.tuned"]) and min(abs(lam / g - 1) for g in default_lambda_grid()) < 1e-6
