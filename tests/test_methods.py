"""The solver families: parameter counts of Table 3 of Guan et al. [3], every method on every task."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hydra
import pytest
import torch

from conftest import CONF, TINY, compose_cfg, picks_phantoms, run_train, write_denoiser_ckpt
from jfb_ip.nets import count_parameters

METHODS = sorted(p.stem for p in (Path(CONF) / "method").glob("*.yaml"))
TASKS = sorted(p.stem for p in (Path(CONF) / "task").glob("*.yaml"))

# Table 3 of Guan et al. [3] (K = 8, one learnable step size) for 1 (CT) and 2 (MRI) channels,
# and LUSER-DW for 3 channels. The table's other 3-channel entries (LU-DnCNN 558,580,
# LUSER-SW 96,503) are 243 = 3 x 9 x 9 above what Table 1 gives: we get 558,337 and 96,260.
TABLE3 = {("lu_dncnn", 1): 556_033, ("lu_dncnn", 2): 557_185, ("luser_sw", 1): 93_954, ("luser_sw", 2): 95_107,
          ("luser_dw", 1): 751_625, ("luser_dw", 2): 760_849, ("luser_dw", 3): 770_073,
          ("lu_dncnn", 3): 558_337, ("luser_sw", 3): 96_260}


@pytest.mark.parametrize("method,channels", sorted(TABLE3))
def test_parameter_counts_match_guan_table_3(method, channels, tmp_path):
    cfg = compose_cfg("train", [f"method={method}", f"data.channels={channels}"], tmp_path)
    assert count_parameters(hydra.utils.instantiate(cfg.method, _convert_="all")) == TABLE3[(method, channels)]


def test_lu_dncnn_refuses_a_fixed_point_backward_mode(tmp_path):
    cfg = compose_cfg("train", ["method=lu_dncnn", "backward=implicit"], tmp_path)
    with pytest.raises(Exception, match="no fixed point"):
        hydra.utils.instantiate(cfg.method, _convert_="all")
    assert compose_cfg("train", ["method=lu_dncnn"], tmp_path).backward.mode == "unroll"


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["cover", "product"])
@pytest.mark.integration
def test_every_method_on_every_task_multirun(full, tmp_path):
    """product (make test-full, about 7 minutes on 2 cores): every method x every task; cover (the default suite):
    each family on two tasks, rotating, so every method and every task runs at least once."""
    # no data.dataset.* keys: the sweep mixes data=natural with the data=phantoms of the CT/MRI tasks
    # 24 px: task=multitask draws SR factors 1..4, so the side must be a multiple of 12
    drop = ("method.", "task.", "solver.", "data.dataset.", "data.image_size")
    overrides = [o for o in TINY if not o.startswith(drop)]
    overrides.append("data.image_size=24")
    # shrink each family with the keys it has (++: the sweep first composes the default method)
    families = ((["degrad", "deprox"], ["method.net.depth=3", "method.net.width=8", "solver.max_iter=5"]),
                (["lu_dncnn"], ["++method.net.depth=3", "++method.net.width=8", "++method.stages=2"]),
                (["luser_sw", "luser_dw"], ["solver.max_iter=3", "++method.stages=2"]),
                (["wiener"], []),
                (["mtdeq"], ["++method.net.features=[8,16]", "++method.net.blocks=1", "solver.max_iter=5"]),
                (["denoiser"], ["++method.net.features=[8,16]", "++method.net.blocks=1"]),
                (["tv"], ["++method.max_iter=10", "++method.lambda_grid=[0.01]"]))
    # PnP-ADMM's prior is a checkpoint for one channel count: the gray (CT/MRI) tasks get a 1-channel one
    gray = [t for t in TASKS if picks_phantoms(t)]
    pnp = ["++method.n_iter=2", "++method.lambda_grid=[0.23]"]
    runs = [(ms, extra, TASKS) for ms, extra in families] + \
        [(["pnp_admm"], pnp + [f"method.denoiser.path={write_denoiser_ckpt(tmp_path / 'rgb.ckpt', 3)}"],
          [t for t in TASKS if t not in gray]),
         (["pnp_admm"], pnp + [f"method.denoiser.path={write_denoiser_ckpt(tmp_path / 'gray.ckpt', 1)}"], gray)]
    assert sorted({m for ms, _, _ in runs for m in ms}) == METHODS  # a new method must join this test
    if not full:
        slot = iter(range(10 ** 6))
        runs = [(ms, extra, [tasks[next(slot) % len(tasks)] for _ in range(2)]) for ms, extra, tasks in runs]
        # the rotation reaches every task: 9 runs x 2 slots over the 10 tasks
        assert sorted({t for _, _, ts in runs for t in ts}) == TASKS, "re-balance the rotation: a task is left out"

    def sweep(k, methods, extra, tasks):
        return run_train(["-m", f"method={','.join(methods)}", f"task={','.join(tasks)}", *overrides, *extra,
                          f"hydra.sweep.dir={tmp_path}/{k}_{methods[0]}"], tmp_path, timeout=900)

    # two sweeps at a time, one thread each: the 2-core CI machine runs them side by side
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda a: sweep(*a), [(k, *run) for k, run in enumerate(runs)]))
    for (methods, _, tasks), r in zip(runs, results):
        assert r.returncode == 0, f"method={methods} task={tasks}: " + r.stderr[-3000:]
    jobs = sum(len(methods) * len(tasks) for methods, _, tasks in runs)
    assert len(list(tmp_path.glob("*/*/metrics.json"))) == jobs


def test_memory_lean_groupnorm_leakyrelu_matches_torch():
    import torch
    from torch import nn

    from jfb_ip.nets.inplace_norm import GroupNormLeakyReLU, _GroupNormLeakyReLU

    torch.manual_seed(0)
    m = GroupNormLeakyReLU(4, 8, 0.1).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
    ref = nn.Sequential(nn.GroupNorm(4, 8), nn.LeakyReLU(0.1)).double()
    ref[0].load_state_dict(m.state_dict())
    x = torch.randn(3, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(m(x), ref(x), atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: _GroupNormLeakyReLU.apply(*a, 4, 1e-5, 0.1), (x, m.weight, m.bias))


def test_luser_inner_solves_report_backward_stats(tmp_path):
    import torch

    cfg = compose_cfg("train", ["method=luser_dw", "backward=implicit", "method.stages=2", "task.kernel_size=5"],
                      tmp_path)
    method = hydra.utils.instantiate(cfg.method, _convert_="all")
    task = hydra.utils.instantiate(cfg.task)
    x = torch.rand(2, 3, 12, 12)
    rec = method(task.sample(x, seeds=torch.arange(2)))
    assert rec.stats.backward_iterations is None  # the backward solves have not run yet
    ((rec.x - x) ** 2).mean().backward()
    merged = rec.solver_stats()
    assert len(merged.parts) == 2 and merged.backward_iterations is not None
    assert all((p.backward_iterations >= 1).all() for p in merged.parts)
    assert torch.equal(merged.backward_iterations, merged.parts[0].backward_iterations + merged.parts[1].backward_iterations)
    assert all(p.grad is not None for p in method.blocks[0].parameters() if p.requires_grad)


def test_luser_block_step_is_eq_7_computed_from_its_weights():
    """Guan et al. [3] eq. 7: r -> Mix(Data(r) (+) Inj(d)), recomputed here with plain torch ops on the
    block's (normalised) weights, GroupNorm with the block's eps and a concatenation."""
    import torch
    import torch.nn.functional as F

    from jfb_ip.nets import LUSERBlock

    torch.manual_seed(0)
    block = LUSERBlock(channels=2, width=8, groups=4, norm_eps=0.5).double().eval()  # eval: no power-iteration step per weight read
    d, r = torch.randn(3, 2, 9, 11, dtype=torch.float64), torch.randn(3, 2, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        for m in block.modules():  # non-trivial affine GroupNorm parameters
            if hasattr(m, "groups") and hasattr(m, "bias"):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)

    def conv(layer, x):
        return F.conv2d(x, layer.weight, layer.bias, padding=1)

    def gn_act(layer, x):
        return F.leaky_relu(F.group_norm(x, 4, layer.weight, layer.bias, 0.5), 0.01)

    with torch.no_grad():
        inj = F.leaky_relu(conv(block.injection[2], F.leaky_relu(conv(block.injection[0], d), 0.01)), 0.01)
        data = gn_act(block.data[3], conv(block.data[2], gn_act(block.data[1], conv(block.data[0], r))))
        h = gn_act(block.mixing[1], conv(block.mixing[0], torch.cat([data, inj], 1)))
        expected = conv(block.mixing[4], gn_act(block.mixing[3], conv(block.mixing[2], h)))
        got = block.step(r.clone(), block.inject(d))
    assert torch.allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize("method", ["luser_dw", "luser_sw"])
def test_luser_inner_solves_converge_at_initialisation(method, tmp_path):
    """At least 99% of the inner solves reach tol within max_iter on the default config."""
    import torch

    from jfb_ip.data import NaturalImages

    cfg = compose_cfg("train", [f"method={method}"], tmp_path)
    torch.manual_seed(0)
    m = hydra.utils.instantiate(cfg.method, _convert_="all")
    ds = NaturalImages("val", 32, 3, eval_crops=4)
    x = torch.stack([ds[i][0] for i in range(4)])
    with torch.no_grad():
        stats = m(hydra.utils.instantiate(cfg.task).sample(x, seeds=torch.arange(4))).stats
    converged = torch.stack([p.converged for p in stats.parts])
    assert converged.float().mean() >= 0.99, [p.residual.max().item() for p in stats.parts]


@pytest.mark.parametrize("backward,updates", [("jfb", 1), ("unroll", 3)])
def test_batchnorm_inside_a_fixed_point(backward, updates):
    """The no-grad solve uses BatchNorm's running statistics, so a sample's fixed point does
    not depend on the rest of its batch and the running averages move only in the differentiable
    application(s) (JFB: one; unroll: unroll_steps), never once per solver iteration."""
    from jfb_ip.methods import DEGRAD
    from jfb_ip.nets import DnCNN
    from jfb_ip.physics import Deblur

    torch.manual_seed(0)
    net = DnCNN(3, depth=4, width=8, batch_norm=True, spectral_norm=True, gamma=0.99)
    bw = {"mode": backward, **({"unroll_steps": 3} if backward == "unroll" else {})}
    m = DEGRAD(net, solver={"name": "anderson", "tol": 1e-6, "max_iter": 200}, backward=bw)
    x = torch.rand(4, 3, 24, 24)
    task = Deblur()
    meas = task.sample(x, seeds=torch.arange(4))
    bns = [b for b in net.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    with torch.no_grad():  # running statistics away from their (0, 1) initialisation
        for b in bns:
            b.running_mean.uniform_(-0.2, 0.2)
            b.running_var.uniform_(0.5, 2.0)
    m.train()
    rec = m(meas)
    assert all(int(b.num_batches_tracked) == updates for b in bns)
    rec.x.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    # the same sample alone and in its batch: the same equilibrium of the training-mode solve
    with torch.no_grad():
        from jfb_ip.methods.base import running_stats_without_grad
        f_all = running_stats_without_grad(lambda z: m.T(z, meas, m.step_size(meas, z)), m)
        one = task.sample(x[:1], seeds=torch.arange(1))
        f_one = running_stats_without_grad(lambda z: m.T(z, one, m.step_size(one, z)), m)
        z_all, z_one = meas.init(), one.init()
        for _ in range(300):  # plain iteration: no solver in the comparison
            z_all, z_one = f_all(z_all), f_one(z_one)
    assert float((z_all[:1] - z_one).abs().max()) < 1e-5
    assert all(int(b.num_batches_tracked) == updates for b in bns)  # no-grad evaluations never move them


def test_luser_operator_norm_mode_bounds_the_inner_map():
    """LUSERBlock's promise: with norm_mode=operator and max_norm_gain=g, Lip(r -> step(r)) <=
    gamma^5 (g / sqrt(eps))^4, measured by power iteration on J^T J (worst-case directions) at
    random points, with GroupNorm weights pushed beyond g. The same weights in kernel mode exceed
    the bound, so the check can fail; the parameter count does not depend on the mode."""
    import torch

    from jfb_ip.nets import LUSERBlock
    from jfb_ip.nets.dncnn import count_parameters
    from jfb_ip.solvers.lipschitz import local_lipschitz

    def block(mode, gain):
        torch.manual_seed(0)
        b = LUSERBlock(channels=1, width=8, groups=4, gamma=0.99, norm_mode=mode, max_norm_gain=gain).double()
        with torch.no_grad():
            for m in b.modules():
                if hasattr(m, "groups") and hasattr(m, "bias"):
                    m.weight.uniform_(1.5, 3.0)  # beyond the gain bound: clamped in operator mode
                    m.bias.uniform_(-0.5, 0.5)
        return b.eval()

    g = torch.Generator().manual_seed(1)
    d = torch.rand(3, 1, 13, 15, dtype=torch.float64, generator=g)
    r = 0.3 * torch.randn(3, 1, 13, 15, dtype=torch.float64, generator=g)
    bound = 0.99 ** 5
    lips = {}
    for mode, gain in (("operator", 1.0), ("kernel", None)):
        b = block(mode, gain)
        b.step(r, b.inject(d))  # records mixing[0]'s input size for its operator norm
        inj = b.inject(d).detach()
        lips[mode] = local_lipschitz(lambda z: b.step(z, inj), r, n_iter=200, tol=1e-7, generator=g)
    assert (lips["operator"] <= bound * (1 + 1e-3)).all(), lips
    assert (lips["kernel"] > bound).all(), lips
    assert count_parameters(LUSERBlock(channels=1, norm_mode="operator")) == count_parameters(LUSERBlock(channels=1))


@pytest.mark.parametrize("inject", ["none", "input", "anchor"])
@pytest.mark.parametrize("task", ["deblur", "inpaint", "sr2", "mri4x"])
def test_degrad_prox_data_step_reaches_the_gradient_form_equilibrium(task, inject):
    """data_step=prox: its fixed point solves eq. (3.5) of Liu et al. [1], A^T(Ax - d) + lam (x - N(x)) = 0
    (computed here from the operator and the network, not from either T), and is the gradient form's.
    With injection N(x) is net([x, z0]) (``input``) or z0 + tanh(g) net([x, z0]) (``anchor``), z0 the task's init."""
    from jfb_ip.methods import DEGRAD
    from jfb_ip.nets import DnCNN
    from jfb_ip.physics import Deblur, Inpaint, SingleCoilMRI, SuperResolution

    D = torch.float64
    make = {"deblur": lambda: Deblur(kernel_size=5, channels=1), "inpaint": lambda: Inpaint(p_drop=0.7, channels=1),
            "sr2": lambda: SuperResolution(factor=2, channels=1), "mri4x": lambda: SingleCoilMRI(acceleration=4)}
    torch.manual_seed(0)
    cin = 1 if inject == "none" else 2
    net = DnCNN(cin, 1, depth=3, width=8, spectral_norm=True, gamma=0.9).to(D).eval()
    x = torch.rand(2, 1, 16, 16, dtype=D)
    meas = make[task]().sample(x, seeds=torch.arange(2))
    z0 = meas.init()
    N = {"none": lambda z: net(z), "input": lambda z: net(torch.cat([z, z0], 1)),
         "anchor": lambda z: z0 + math.tanh(0.7) * net(torch.cat([z, z0], 1))}[inject]
    solver = {"name": "anderson", "tol": 1e-11, "max_iter": 500}
    fixed = {}
    for step in ("gradient", "prox"):
        # gate_init=0.7 (anchor): the default gate 0 gives N = z0; open it so the network takes part
        m = DEGRAD(net, solver=solver, backward={"mode": "jfb"}, reg_weight=0.3, data_step=step,
                   inject=inject, **({"gate_init": 0.7} if inject == "anchor" else {})).to(D).eval()
        with torch.no_grad():
            rec = m(meas)
        assert bool(rec.stats.converged.all()), (step, rec.stats.residual)
        fixed[step] = rec.x
    z = fixed["prox"]
    with torch.no_grad():
        eq = meas.A_adjoint(meas.physics.A(z) - meas.y) + 0.3 * (z - N(z))
    assert float(eq.norm() / meas.A_adjoint(meas.y).norm()) < 1e-8
    assert torch.allclose(fixed["gradient"], z, atol=1e-7)


def test_degrad_prox_step_moves_dropped_pixels_to_the_network_output():
    """On pixels the mask drops, T_prox(x) = N(x) exactly (eq. (3.6)'s gradient step moves them by eta lam only)."""
    from jfb_ip.methods import DEGRAD
    from jfb_ip.nets import DnCNN
    from jfb_ip.physics import Inpaint

    torch.manual_seed(0)
    net = DnCNN(3, depth=3, width=8).eval()
    solver = {"name": "anderson", "tol": 1e-3, "max_iter": 50}
    m = DEGRAD(net, solver=solver, backward={"mode": "jfb"}, data_step="prox")
    meas = Inpaint(p_drop=0.5).sample(torch.rand(2, 3, 12, 12), seeds=torch.arange(2))
    z = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        out, n = m.T(z, meas, None), net(z)
    holes = meas.physics.mask == 0
    assert bool(holes.any()) and torch.allclose(out[holes.expand_as(out)], n[holes.expand_as(n)], atol=1e-6)
    with pytest.raises(ValueError, match="data_step=prox takes no step size"):
        DEGRAD(net, solver=solver, backward={"mode": "jfb"}, data_step="prox", eta=0.5)
    with pytest.raises(ValueError, match="data_step must be one of"):
        DEGRAD(net, solver=solver, backward={"mode": "jfb"}, data_step="newton")
    with pytest.raises(ValueError, match="inject must be one of"):
        DEGRAD(net, solver=solver, backward={"mode": "jfb"}, inject=True)
    with pytest.raises(ValueError, match="gate_init=0.1 sets the anchor gate, which only inject=anchor or tv_prior has"):
        DEGRAD(net, solver=solver, backward={"mode": "jfb"}, inject="input", gate_init=0.1)
    with pytest.raises(ValueError, match="gate_init must be a finite number"):
        DEGRAD(net, solver=solver, backward={"mode": "jfb"}, inject="anchor", gate_init=float("nan"))
    with pytest.raises(ValueError, match="set method.net.in_channels to twice data.channels"):
        DEGRAD(net, solver=solver, backward={"mode": "jfb"}, inject="anchor")(meas)


def test_degrad_wiener_initializer_is_tuned_once_on_the_first_training_batch():
    """initializer=wiener: the module picks the grid's best Tikhonov weight for the first training batch (checked here
    against PSNRs computed from tikhonov() and the truth), fixes it, and z0 is that Tikhonov estimate."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from jfb_ip.lit import ReconstructionModule
    from jfb_ip.methods import DEGRAD
    from jfb_ip.methods.classical import tikhonov
    from jfb_ip.nets import DnCNN
    from jfb_ip.physics import Inpaint

    torch.manual_seed(0)
    task = Inpaint(p_drop=0.7, channels=1)
    x = torch.rand(3, 1, 16, 16).cumsum(-1) / 16  # smooth ramps: a clear optimum of the smoothness weight
    meas = task.sample(x, seeds=torch.arange(3))
    m = DEGRAD(DnCNN(2, 1, depth=3, width=8), solver={"name": "anderson", "tol": 1e-3, "max_iter": 20},
               backward={"mode": "jfb"}, inject="anchor", initializer="wiener")
    module = ReconstructionModule(m, task)
    L = meas.lambda_max()

    def psnr(lam):
        est = tikhonov(meas, lam * L, "gradient")
        return sum(float(peak_signal_noise_ratio(est[i:i + 1].clamp(0, 1), x[i:i + 1], data_range=1.0))
                   for i in range(3))

    best = max(m.wiener.lambda_grid, key=psnr)
    module.calibrate_parts(meas, x)
    assert bool(m.wiener.tuned) and float(m.wiener.lam) == pytest.approx(best)
    assert torch.allclose(m.init(meas), tikhonov(meas, best * L, "gradient"), atol=1e-5)
    other = task.sample(torch.rand(3, 1, 16, 16), seeds=torch.arange(3, 6))
    module.calibrate_parts(other, torch.rand(3, 1, 16, 16))  # later batches leave it alone
    assert float(m.wiener.lam) == pytest.approx(best)
    with pytest.raises(ValueError, match="initializer must be one of"):
        DEGRAD(DnCNN(1, depth=3, width=8), solver={"name": "anderson", "tol": 1e-3, "max_iter": 20},
               backward={"mode": "jfb"}, initializer="fbp")


@pytest.mark.parametrize("step", ["gradient", "prox"])
def test_degrad_relative_prior_weight_solves_the_rescaled_equation(step):
    """reg_relative: the fixed point solves A^T(Ax - d) + lam L (x - N(x)) = 0 with L = ||A||^2 taken here from the
    dense matrix of A (SR x2: L near 1/4, so the absolute form's equation does not hold)."""
    from jfb_ip.methods import DEGRAD
    from jfb_ip.nets import DnCNN
    from jfb_ip.physics import SuperResolution

    D = torch.float64
    torch.manual_seed(0)
    net = DnCNN(1, depth=3, width=8, spectral_norm=True, gamma=0.9).to(D).eval()
    x = torch.rand(2, 1, 16, 16, dtype=D)
    meas = SuperResolution(factor=2, channels=1).sample(x, seeds=torch.arange(2))
    op = meas.physics
    cols = torch.eye(256, dtype=D).reshape(256, 1, 1, 16, 16)
    dense = torch.stack([op.A(c.expand(2, 1, 16, 16))[0].flatten() for c in cols], 1)
    L = float(torch.linalg.matrix_norm(dense, 2)) ** 2
    m = DEGRAD(net, solver={"name": "anderson", "tol": 1e-11, "max_iter": 500}, backward={"mode": "jfb"},
               reg_weight=0.3, data_step=step, reg_relative=True).to(D).eval()
    with torch.no_grad():
        z = m(meas).x
        eq = meas.A_adjoint(op.A(z) - meas.y) + 0.3 * L * (z - net(z))
        absolute = meas.A_adjoint(op.A(z) - meas.y) + 0.3 * (z - net(z))
    scale = meas.A_adjoint(meas.y).norm()
    assert float(eq.norm() / scale) < 1e-7 and float(absolute.norm() / scale) > 1e-3
    assert 0.15 < L < 0.3


@pytest.mark.parametrize("task,closed_form", [("deblur", True), ("ct", False)])
def test_degrad_auto_data_step_follows_the_operators_prox(task, closed_form):
    """data_step=auto: T is T_prox, (A^T A + lam I)^{-1}(A^T d + lam N(x)), where the data prox is a closed form
    (circular blur), and eq. (3.6)'s gradient step x - eta (A^T(Ax - d) + lam (x - N(x))) with eta = 1/(L + 1)
    where it is not (CT); both computed here from A, A^T and the network."""
    from jfb_ip.methods import DEGRAD
    from jfb_ip.nets import DnCNN
    from jfb_ip.physics import Deblur, ParallelBeamCT

    torch.manual_seed(0)
    net = DnCNN(1, depth=3, width=8).double().eval()
    phys = Deblur(kernel_size=5, channels=1) if task == "deblur" else ParallelBeamCT(n_angles=9)
    meas = phys.sample(torch.rand(2, 1, 16, 16, dtype=torch.float64), seeds=torch.arange(2))
    m = DEGRAD(net, solver={"name": "anderson", "tol": 1e-3, "max_iter": 20}, backward={"mode": "jfb"},
               reg_weight=0.2, data_step="auto").double()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        out = m.T(x, meas, m.step_size(meas, x))
        n = net(x)
        if closed_form:  # check T_prox through its normal equations: (A^T A + lam) T = A^T d + lam N
            res = meas.A_adjoint(meas.A(out)) + 0.2 * out - meas.A_adjoint(meas.y) - 0.2 * n
        else:
            eta = 1 / (meas.lambda_max().reshape(-1, 1, 1, 1) + 1)
            res = out - (x - eta * (meas.A_adjoint(meas.A(x) - meas.y) + 0.2 * (x - n)))
    assert m.uses_prox(meas) == closed_form
    assert float(res.norm() / out.norm()) < 1e-6


def test_degrad_default_starts_at_the_data_prox_of_the_wiener_estimate(tmp_path):
    """The default config's untrained equilibrium (gate g = 0, so N(x) = z0) is the closed form
    (A^T A + lam L I)^{-1}(A^T d + lam L z0), z0 the Tikhonov/Wiener estimate (method.initializer=wiener, the method's
    default; deblurring's default anchors at smoothed TV instead); checked through its normal equations."""
    from jfb_ip.methods.classical import tikhonov
    from jfb_ip.physics import Deblur

    assert compose_cfg("train", TINY, tmp_path).method.initializer == "smooth_tv"
    cfg = compose_cfg("train", TINY + ["method.initializer=wiener"], tmp_path)
    m = hydra.utils.instantiate(cfg.method, _convert_="all").eval()
    assert float(m.anchor_gate) == 0.0
    meas = Deblur(kernel_size=5, channels=3).sample(torch.rand(2, 3, 16, 16), seeds=torch.arange(2))
    with torch.no_grad():
        x = m(meas).x
    L = meas.lambda_max().reshape(-1, 1, 1, 1)
    mu = float(m.reg_weight) * L
    z0 = tikhonov(meas, float(m.wiener.lam) * L, "gradient")
    res = meas.A_adjoint(meas.A(x)) + mu * x - meas.A_adjoint(meas.y) - mu * z0
    assert float(res.norm() / x.norm()) < 1e-4
