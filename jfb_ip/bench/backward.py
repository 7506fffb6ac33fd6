"""Cost of one training step per backward mode as the image side grows (Fig. 2 of Liu et al. [1]).

For each image side, one DE-GRAD model (DnCNN depth 17, width 64, spectral norm, gamma 0.99)
on the blur task Deblur(9, 5.0, 0.01) and a batch of random RGB images, every backward mode
(jfb, implicit, neumann, unroll, phantom and, when torchdeq is installed, torchdeq's one-step
and IFT gradients on the same map) takes training steps from the same initial weights:
forward solve + loss + backward + Adam step. The forward solver (Anderson), its tolerance
and cap are the same for all; the implicit backward solve runs at the forward tolerance.

Measured, per (mode, side):
  time_s     median wall time of the timed steps (modes interleaved within each repeat, after
             warm-up steps; weights reloaded before every step, so every step solves the same map).
  memory     forward + backward of one step, optimizer step excluded. On CUDA: peak allocated
             bytes above what was allocated before the step. On CPU: the bytes of the distinct
             storages saved for backward (``saved_tensors_hooks``) during forward and backward;
             the graph-free work is not counted: the no-grad forward solve's buffers (same for
             every mode) and the implicit backward solve's Anderson buffers, which live only
             inside its tensor hook; a graph built during backward (torchdeq's IFT re-evaluates
             f(z*) there) is counted.
  floor_time_s  (jfb rows) the same step done by hand, without the backward-mode machinery:
             no-grad Anderson solve, one forward and backward of T at z*, the same Adam step.
  grad_cos_to_implicit  cosine between the flattened parameter gradient and the implicit one
             (itself at tolerance ``tol``, not the exact gradient), same weights and batch.

Peer rows (torchdeq_jfb, torchdeq_implicit, deepinv_jfb, deepinv_implicit; ``pip install -e .[peers]``,
each peer skipped with a message when it is absent) run the peer's DEQ on the same DE-GRAD map, weights, batch,
relative tolerance and caps. Every peer row carries ``peer_settings``:
  default    the peer's own defaults for everything else. torchdeq: forward Anderson m = 6, absolute
             lam = 1e-4; backward fixed-point iteration (its b_solver default). deepinv: forward Anderson
             (AndersonAccelerationConfig: history 10, beta 0.9, absolute eps 0.1), backward plain
             iteration with its own cap (DEQConfig: 50); its stop rule is its own (batch-mean relative
             change of successive iterates). Compared with jfb-ip's default rows (jfb, implicit).
  matched    same tolerance, caps, memory m = 5, damping 1 and regulariser both ways (forward and
             backward Anderson). The peers' regulariser is absolute (H = G G^T + lam I) where jfb-ip's
             scales lam by mean ||g_i||^2; no absolute value equals the scaled one at every iteration,
             so jfb-ip runs with the peers' convention instead (anderson(scale_lam=False), lam = 1e-4 on
             both sides): the rows jfb_matched and implicit_matched, which matched peer rows are compared with.
Each peer row names its jfb-ip row (``vs``) and carries time_ratio_ours_to_peer = time_s[vs] / time_s.

The "forward" list compares the forward solvers alone (no grad, same map, z0 and batch): per solver
(anderson, broyden), peer (torchdeq; deepinv has no Broyden) and settings, each side's jfb-ip and peer
solves run interleaved (one untimed round, then ``repeats`` timed); evals = calls of the map (counted by a
wrapper), time = median seconds, residual = max over the batch of ||f(z) - z|| / ||f(z)|| at the returned z
(one extra evaluation, not counted), ratios jfb-ip / peer.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import os
import statistics
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..methods import DEGRAD
from ..methods.base import fixed_weights
from ..nets.dncnn import DnCNN
from ..physics import Deblur
from ..linalg import relative_residual
from ..solvers import FORWARD_SOLVERS
from .common import (SavedBytes, device, float_at_least, int_at_least, output_file, pyplot, save_figure,
                     write_outputs)

MODES = ("jfb", "implicit", "neumann", "unroll", "phantom")
PEERS = ("torchdeq_jfb", "torchdeq_implicit", "deepinv_jfb", "deepinv_implicit")
PEER_PACKAGES = ("torchdeq", "deepinv")
SETTINGS = ("default", "matched")
MATCHED = ("jfb_matched", "implicit_matched")  # jfb-ip's modes with the peers' absolute Anderson regulariser
KEYS = ("mode", "side", "batch", "time_s", "time_ratio_to_jfb", "memory_bytes", "memory_ratio_to_jfb", "fwd_iters",
        "bwd_iters", "grad_cos_to_implicit", "fwd_tol", "bwd_tol", "bwd_residual", "floor_time_s", "peer",
        "peer_settings", "vs", "time_ratio_ours_to_peer")
FORWARD_KEYS = ("solver", "peer", "peer_settings", "side", "batch", "evals", "peer_evals", "evals_ratio", "time_s",
                "peer_time_s", "time_ratio", "residual", "peer_residual", "tol", "max_iter")
M, LAM = 5, 1e-4  # jfb-ip's Anderson memory and regulariser (conf/solver/anderson.yaml), matched on the peers


def missing_peers() -> dict:
    """{peer: reason} for each peer package that cannot be imported here."""
    out = {}
    for name in PEER_PACKAGES:
        if importlib.util.find_spec(name) is None:
            out[name] = f"{name} not installed (pip install -e .[peers])"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a peer that fails to import is skipped, never fatal
            out[name] = f"{name} failed to import: {type(e).__name__}: {e}"
    return out


def _mean(t):
    return None if t is None else float(torch.as_tensor(t).float().mean())


def _max(t):
    return None if t is None else float(torch.as_tensor(t).float().max())


def _ours(method, meas):
    def forward():
        rec = method(meas)
        stats = rec.stats
        return rec.x, lambda: (_mean(stats.iterations), _mean(stats.backward_iterations), _max(stats.backward_residual))
    return forward, nullcontext


def _floor(method, meas, tol, max_iter):
    def forward():
        with fixed_weights(method):
            z0 = meas.init()
            eta = method.step_size(meas, z0)
            f = lambda z: method.T(z, meas, eta)  # noqa: E731
            with torch.no_grad():
                z, stats = FORWARD_SOLVERS["anderson"](f, z0, tol=tol, max_iter=max_iter)
            return f(z), lambda: (_mean(stats.iterations), None, None)
    return forward, nullcontext


def _torchdeq(method, meas, ift, tol, max_iter, matched):
    """torchdeq's DEQ (one-step grad, or IFT by its autograd.Function) on the same DE-GRAD map; the
    whole step runs with the weights cached, since its IFT re-evaluates f(z*) during backward.
    matched: forward and backward Anderson with m = 5, absolute lam = 1e-4 (get_deq takes no backward
    solver options, so the IFT gradient is rebuilt by torchdeq's own backward_factory with them)."""
    from torchdeq import get_deq
    from torchdeq.grad import backward_factory
    deq = get_deq(core="sliced", f_solver="anderson", f_max_iter=max_iter, f_tol=tol, f_stop_mode="rel",
                  b_solver="anderson" if matched else "fixed_point_iter", b_max_iter=max_iter, b_tol=tol,
                  b_stop_mode="rel", ift=ift, grad=1)
    kwargs = {"m": M, "lam": LAM, "tau": 1.0} if matched else {}
    if ift and matched:
        deq.produce_grad[-1] = backward_factory(grad_type="ift", hook_ift=False, b_solver=deq.b_solver,
                                                b_solver_kwargs=dict(max_iter=max_iter, tol=tol, stop_mode="rel",
                                                                     **kwargs))

    def forward():
        bwd = {}
        z0 = meas.init()
        eta = method.step_size(meas, z0)
        zs, info = deq(lambda z: method.T(z, meas, eta), z0, solver_kwargs=dict(kwargs), backward_writer=bwd.update)
        return zs[-1], lambda: (_mean(info["nstep"]), _mean(bwd.get("nstep")), _max(bwd.get("rel_lowest")))
    return forward, lambda: fixed_weights(method)


def _deepinv_optim(f, z0_fn, tol, max_iter, matched, deq=None, counter=None):
    """deepinv's BaseOptim iterating ``f`` with Anderson acceleration (its DEQ when ``deq`` is a DEQConfig)."""
    from deepinv.optim import AndersonAccelerationConfig, BaseOptim
    from deepinv.optim.optim_iterators import OptimIterator

    class Step(OptimIterator):  # X = {"est": (z,)} -> {"est": (f(z),)}
        def forward(self, X, *args, **kwargs):
            return {"est": (f(X["est"][0]),), "cost": None}

    accel = AndersonAccelerationConfig(history_size=M, beta=1.0, eps=LAM) if matched else AndersonAccelerationConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BaseOptim(Step(), max_iter=max_iter, crit_conv="residual", thres_conv=tol, early_stop=True,
                         custom_init=lambda y, physics: {"est": (z0_fn(),)}, trainable_params=[], DEQ=deq,
                         anderson_acceleration=accel)


def _deepinv(method, meas, ift, tol, max_iter, matched):
    """deepinv's DEQ (BaseOptim with DEQConfig: jacobian_free for JFB, its hook for IFT) on the same map.
    It evaluates the map once more with graph (x = T(z*)) and, for IFT, once more at x.detach() for the
    backward fixed point, solved by plain iteration (default) or Anderson (matched)."""
    from deepinv.optim import DEQConfig
    state, count = {}, {"fwd": 0, "bwd": 0}

    def f(z):
        out = state["f"](z)
        if torch.is_grad_enabled() and out.requires_grad:  # every vjp through the map passes here
            out.register_hook(lambda g: count.__setitem__("bwd", count["bwd"] + 1))
        else:
            count["fwd"] += 1
        return out

    deq = DEQConfig(jacobian_free=not ift, anderson_acceleration_backward=matched, history_size_backward=M,
                    beta_backward=1.0, eps_backward=LAM, max_iter_backward=max_iter) if matched \
        else DEQConfig(jacobian_free=not ift)
    optim = _deepinv_optim(f, lambda: state["z0"], tol, max_iter, matched, deq=deq)

    def forward():
        count.update(fwd=0, bwd=0)
        state["z0"] = meas.init()
        eta = method.step_size(meas, state["z0"])
        state["f"] = lambda z: method.T(z, meas, eta)
        x = optim(None, None)
        # bwd: vjps of the backward solve (the one through x = T(z*) itself not counted)
        return x, lambda: (float(count["fwd"]), float(count["bwd"] - 1) if ift else None, None)
    return forward, lambda: fixed_weights(method)


def _counted(f):
    n = [0]

    def g(z):
        n[0] += 1
        return f(z)
    return g, n


def _forward_variants(missing, tol, max_iter):
    """{(solver, who, settings): solve(f, z0) -> z} for jfb-ip and each available peer."""
    from functools import partial
    v = {("anderson", "jfb-ip", "default"): partial(FORWARD_SOLVERS["anderson"], tol=tol, max_iter=max_iter),
         ("anderson", "jfb-ip", "matched"): partial(FORWARD_SOLVERS["anderson"], tol=tol, max_iter=max_iter, m=M,
                                                    lam=LAM, scale_lam=False),
         # memory 30 >= max_iter - 1 updates: never restarts, like torchdeq's (memory = its max_iter)
         ("broyden", "jfb-ip", "default"): partial(FORWARD_SOLVERS["broyden"], tol=tol, max_iter=max_iter,
                                                   memory=max(max_iter, 30))}
    v["broyden", "jfb-ip", "matched"] = v["broyden", "jfb-ip", "default"]
    first = lambda solve: lambda f, z0: solve(f, z0)[0]  # noqa: E731
    v = {k: first(s) for k, s in v.items()}
    if "torchdeq" not in missing:
        from torchdeq.solver import get_solver
        td_and, td_bro = get_solver("anderson"), get_solver("broyden")
        v["anderson", "torchdeq", "default"] = lambda f, z0: td_and(f, z0, max_iter=max_iter, tol=tol,
                                                                     stop_mode="rel")[0]
        v["anderson", "torchdeq", "matched"] = lambda f, z0: td_and(f, z0, max_iter=max_iter, tol=tol, stop_mode="rel",
                                                                     m=M, lam=LAM, tau=1.0)[0]
        v["broyden", "torchdeq", "default"] = lambda f, z0: td_bro(f, z0, max_iter=max_iter, tol=tol,
                                                                    stop_mode="rel")[0]
        # its max_iter counts updates after a first evaluation: max_iter - 1 makes the evaluation caps equal
        v["broyden", "torchdeq", "matched"] = lambda f, z0: td_bro(f, z0, max_iter=max_iter - 1, tol=tol,
                                                                    stop_mode="rel")[0]
    if "deepinv" not in missing:
        for settings in SETTINGS:
            def solve(f, z0, matched=settings == "matched"):
                return _deepinv_optim(f, lambda: z0, tol, max_iter, matched)(None, None)
            v["anderson", "deepinv", settings] = solve
    return v


def forward_compare(f, z0, side, missing, tol, max_iter, repeats):
    """jfb-ip's and the peers' forward solvers on one map, interleaved; one row per (solver, peer, settings)."""
    variants = _forward_variants(missing, tol, max_iter)
    runs = {k: {"times": []} for k in dict.fromkeys(id(s) for s in variants.values())}
    by_id = {id(s): s for s in variants.values()}
    for r in range(1 + repeats):  # round 0: untimed (warm-up, evaluations, residual)
        for key, run_ in runs.items():
            g, n = _counted(f)
            t0 = time.perf_counter()
            z = by_id[key](g, z0)
            elapsed = time.perf_counter() - t0
            if r == 0:
                run_["evals"] = n[0]
                run_["residual"] = float(relative_residual(f(z), z).max())
            else:
                run_["times"].append(elapsed)
    rows = []
    for (solver, who, settings), s in variants.items():
        if who == "jfb-ip":
            continue
        ours, peer = runs[id(variants[solver, "jfb-ip", settings])], runs[id(s)]
        t, pt = statistics.median(ours["times"]), statistics.median(peer["times"])
        rows.append({"solver": solver, "peer": who, "peer_settings": settings, "side": side, "batch": z0.shape[0],
                     "evals": ours["evals"], "peer_evals": peer["evals"], "evals_ratio": ours["evals"] / peer["evals"],
                     "time_s": t, "peer_time_s": pt, "time_ratio": t / pt, "residual": ours["residual"],
                     "peer_residual": peer["residual"], "tol": tol, "max_iter": max_iter})
    return rows


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(row, x, device, memory=False):
    """One training step from the initial weights; returns (seconds, info, grad, memory)."""
    row["method"].load_state_dict(row["init"])
    opt = row["opt"]
    opt.zero_grad(set_to_none=True)
    mem = grad = None
    if memory and device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    with SavedBytes() if memory and device.type != "cuda" else nullcontext() as saved, row["context"]():
        x_hat, info = row["forward"]()
        F.mse_loss(x_hat, x).backward()
    if memory:
        _sync(device)
        mem = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else saved.nbytes
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in row["method"].parameters()]).double()
    opt.step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    return elapsed, info() if memory else None, grad, mem


def run(sides, batch, modes=MODES + PEERS, repeats=5, *, depth=17, width=64, tol=1e-3, max_iter=30, warmup=1,
        device=None, seed=0, neumann_k=5, unroll_steps=None, phantom_k=5, phantom_damping=0.5,
        peer_settings=SETTINGS, forward=True, log=print) -> dict:
    """Benchmark every mode at every side; returns the JSON payload
    ``{"device", "config", "skipped", "skipped_reason", "rows", "forward"}``.

    Per side: one untimed round (memory, gradient, iteration counts; it also warms up), ``warmup``
    more untimed rounds, then ``repeats`` timed rounds; every round runs each mode once, in turn.
    Then (``forward``) the forward-solver comparison on the same map (see :func:`forward_compare`)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unroll_steps = unroll_steps or max_iter
    missing = missing_peers()
    skipped = [m for m in modes if m in PEERS and m.split("_")[0] in missing]
    for name, why in missing.items():
        log(f"peer rows skipped: {why}")
    modes = [m for m in modes if m not in skipped]
    peer_modes = [m for m in modes if m in PEERS]
    matched = [f"{m.split('_', 1)[1]}_matched" for m in peer_modes] if "matched" in peer_settings else []
    ours_modes = [m for m in modes if m in MODES] + list(dict.fromkeys(matched))
    options = {"implicit": {"backward_solver": "anderson", "backward_tol": tol, "backward_max_iter": max_iter},
               "neumann": {"neumann_k": neumann_k}, "unroll": {"unroll_steps": unroll_steps},
               "phantom": {"phantom_k": phantom_k, "phantom_damping": phantom_damping}}
    solver = {"name": "anderson", "tol": tol, "max_iter": max_iter}
    task = Deblur(9, 5.0, 0.01)
    torch.manual_seed(seed)
    template = DEGRAD(DnCNN(3, depth=depth, width=width, spectral_norm=True, gamma=0.99),
                      solver=solver, backward={"mode": "jfb"}).to(device)
    init = copy.deepcopy(template.state_dict())
    # row keys: jfb-ip modes by name, peers as "name/settings"
    names = ours_modes + (["floor"] if "jfb" in modes else []) + [f"{m}/{s}" for m in peer_modes for s in peer_settings]
    out, fwd_rows = [], []
    for side in sides:
        g = torch.Generator().manual_seed(seed + side)
        x = torch.rand(batch, 3, side, side, generator=g).to(device)
        meas = task.sample(x, generator=torch.Generator(device=device).manual_seed(seed + side))
        rows = {}
        for name in names:
            base, _, settings = name.partition("/")
            mode = base.removesuffix("_matched") if base in MODES + MATCHED else "jfb"
            sol = dict(solver, m=M, lam=LAM, scale_lam=False) if base in MATCHED else solver
            method = DEGRAD(DnCNN(3, depth=depth, width=width, spectral_norm=True, gamma=0.99), solver=sol,
                            backward={"mode": mode, **options.get(mode, {})}).to(device)
            if base in MODES + MATCHED:
                fwd, context = _ours(method, meas)
            elif name == "floor":
                fwd, context = _floor(method, meas, tol, max_iter)
            else:
                peer_fn = _torchdeq if base.startswith("torchdeq") else _deepinv
                fwd, context = peer_fn(method, meas, base.endswith("_implicit"), tol, max_iter, settings == "matched")
            rows[name] = {"method": method, "init": init, "opt": torch.optim.Adam(method.parameters(), lr=1e-4),
                          "forward": fwd, "context": context, "times": []}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deepinv warns about options it does not use here
            for row in rows.values():  # untimed first round (also a warm-up): memory, gradient, iteration counts
                _, row["info"], row["grad"], row["mem"] = _step(row, x, device, memory=True)
            for _ in range(warmup):
                for row in rows.values():
                    _step(row, x, device)
            for _ in range(repeats):
                for row in rows.values():
                    row["times"].append(_step(row, x, device)[0])
        t = {n: statistics.median(r["times"]) for n, r in rows.items()}
        ref = rows.get("implicit", {}).get("grad")
        for name in [n for n in names if n != "floor"]:
            r = rows[name]
            base, _, settings = name.partition("/")
            vs = None
            if settings:
                vs = base.split("_", 1)[1] + ("_matched" if settings == "matched" else "")
            fwd, bwd, bres = r["info"]
            out.append({
                "mode": base, "side": side, "batch": batch, "time_s": t[name],
                "time_ratio_to_jfb": t[name] / t["jfb"] if "jfb" in t else None,
                "memory_bytes": int(r["mem"]),
                "memory_ratio_to_jfb": r["mem"] / rows["jfb"]["mem"] if "jfb" in rows else None,
                "fwd_iters": fwd, "bwd_iters": bwd,
                "grad_cos_to_implicit": None if ref is None else float(F.cosine_similarity(r["grad"], ref, dim=0)),
                "fwd_tol": tol, "bwd_tol": tol if base.endswith("implicit") or base == "implicit_matched" else None,
                "bwd_residual": bres, "floor_time_s": t["floor"] if name == "jfb" else None,
                "peer": base.split("_")[0] if settings else None, "peer_settings": settings or None,
                "vs": vs, "time_ratio_ours_to_peer": t[vs] / t[name] if vs in t else None})
        log(f"side {side}: " + ", ".join(f"{n} {t[n]:.3f}s" for n in names))
        if forward:
            with torch.no_grad(), fixed_weights(template):
                z0 = meas.init()
                eta = template.step_size(meas, z0)
                fwd_rows += forward_compare(lambda z: template.T(z, meas, eta), z0, side, missing, tol, max_iter,
                                            repeats)
            log(f"side {side} forward: " + ", ".join(
                f"{r['solver']}/{r['peer']}/{r['peer_settings']} evals x{r['evals_ratio']:.2f} time x{r['time_ratio']:.2f}"
                for r in fwd_rows if r["side"] == side))
    config = dict(sides=list(sides), batch=batch, modes=list(modes), peer_settings=list(peer_settings),
                  repeats=repeats, warmup=warmup, depth=depth, width=width, tol=tol, max_iter=max_iter, m=M, lam=LAM,
                  neumann_k=neumann_k, unroll_steps=unroll_steps, phantom_k=phantom_k,
                  phantom_damping=phantom_damping, threads=torch.get_num_threads(),
                  memory="cuda peak allocated above the step's start" if device.type == "cuda"
                  else "bytes of tensors saved for backward",
                  peers={p: importlib.metadata.version(p) for p in PEER_PACKAGES if p not in missing})
    return {"device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "config": config, "skipped": skipped, "skipped_reason": missing, "rows": out, "forward": fwd_rows}


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


COLUMNS = (("mode", "mode", "<18", "s"), ("settings", "peer_settings", "<9", "s"), ("side", "side", ">5", "d"),
           ("batch", "batch", ">6", "d"), ("time_s", "time_s", ">9", ".4f"), ("x jfb", "time_ratio_to_jfb", ">7", ".2f"),
           ("memory_bytes", "memory_bytes", ">14", "d"), ("x jfb", "memory_ratio_to_jfb", ">7", ".2f"),
           ("fwd_it", "fwd_iters", ">7", ".1f"), ("bwd_it", "bwd_iters", ">7", ".1f"),
           ("bwd_res", "bwd_residual", ">9", ".1e"), ("cos_impl", "grad_cos_to_implicit", ">10", ".6f"),
           ("floor_s", "floor_time_s", ">9", ".4f"), ("ours/peer", "time_ratio_ours_to_peer", ">10", ".2f"))
FORWARD_COLUMNS = (("solver", "solver", "<10", "s"), ("peer", "peer", "<10", "s"), ("settings", "peer_settings", "<9", "s"),
                   ("side", "side", ">5", "d"), ("evals", "evals", ">6", "d"), ("peer", "peer_evals", ">6", "d"),
                   ("x evals", "evals_ratio", ">8", ".2f"), ("time_s", "time_s", ">9", ".4f"),
                   ("peer", "peer_time_s", ">9", ".4f"), ("x time", "time_ratio", ">8", ".2f"),
                   ("residual", "residual", ">10", ".1e"), ("peer", "peer_residual", ">10", ".1e"))
# matched-row targets, ours against the peer libraries on the same problem: (what, ratio getter, bound)
TARGETS = (("anderson / torchdeq evaluations", "forward", ("anderson", "torchdeq", "evals_ratio"), 1.0),
           ("anderson / torchdeq time", "forward", ("anderson", "torchdeq", "time_ratio"), 1.0),
           ("broyden / torchdeq evaluations", "forward", ("broyden", "torchdeq", "evals_ratio"), 1.0),
           ("broyden / torchdeq time", "forward", ("broyden", "torchdeq", "time_ratio"), 1.0),
           ("implicit / torchdeq_implicit step time", "rows", "torchdeq_implicit", 1.0),
           ("implicit / deepinv_implicit step time", "rows", "deepinv_implicit", 0.8))


def _table(rows, columns, log):
    log("".join(format(head, align) for head, _, align, _ in columns))
    for r in rows:
        log("".join(format(_fmt(r.get(key), spec), align) for _, key, align, spec in columns))


def target_ratios(payload, settings="matched") -> dict:
    """{target name: [(side, ratio), ...]} for the rows with ``settings``, ratios from the raw numbers."""
    out = {}
    for name, where, what, bound in TARGETS:
        vals = []
        if where == "forward":
            solver, peer, key = what
            for r in payload.get("forward", []):
                if (r["solver"], r["peer"], r["peer_settings"]) == (solver, peer, settings):
                    num, den = ("evals", "peer_evals") if key == "evals_ratio" else ("time_s", "peer_time_s")
                    vals.append((r["side"], r[num] / r[den]))
        else:
            by = {(r["mode"], r["side"], r["peer_settings"]): r for r in payload["rows"]}
            for r in payload["rows"]:
                if r["mode"] == what and r["peer_settings"] == settings and (r["vs"], r["side"], None) in by:
                    vals.append((r["side"], by[r["vs"], r["side"], None]["time_s"] / r["time_s"]))
        out[name] = (vals, bound)
    return out


def report(payload, log=print) -> None:
    """The tables and the target lines."""
    _table(payload["rows"], COLUMNS, log)
    by = {(r["mode"], r["side"]): r for r in payload["rows"] if r["peer_settings"] is None}
    sides = sorted({r["side"] for r in payload["rows"]})
    top = sides[-1]
    floor = [(by["jfb", s]["time_s"] / by["jfb", s]["floor_time_s"], s) for s in sides if ("jfb", s) in by]
    if floor:
        worst = max(floor)
        log(f"jfb / floor = {worst[0]:.2f} (target <= 1.10)  [worst side {worst[1]}; all: "
            + ", ".join(f"{s}: {v:.2f}" for v, s in floor) + "]")
    if ("implicit", top) in by and ("jfb", top) in by:
        log(f"implicit / jfb = {by['implicit', top]['time_s'] / by['jfb', top]['time_s']:.2f}  [side {top}]")
    if payload.get("forward"):
        log("forward solvers, jfb-ip / peer (same map, z0 and batch; interleaved, median):")
        _table(payload["forward"], FORWARD_COLUMNS, log)
    for why in payload.get("skipped_reason", {}).values():
        log(f"skipped: {why}")
    for settings in ("matched", "default"):
        for name, (vals, bound) in target_ratios(payload, settings).items():
            if not vals:
                continue
            worst = max(v for _, v in vals)
            verdict = (("met" if worst <= bound else "MISSED") + f" (target <= {bound})") if settings == "matched" \
                else "(no target at default settings)"
            log(f"{settings:8s} {name}: worst {worst:.3f} {verdict}  [" + ", ".join(f"{s}: {v:.3f}" for s, v in vals)
                + "]")


def plot(payload, path) -> bool:
    plt = pyplot(path)
    if plt is None:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, settings in dict.fromkeys((r["mode"], r["peer_settings"]) for r in payload["rows"]):
        rows = [r for r in payload["rows"] if (r["mode"], r["peer_settings"]) == (mode, settings)]
        style = "--" if settings else "-"
        label = f"{mode} ({settings})" if settings else mode
        a.plot([r["side"] for r in rows], [r["time_s"] for r in rows], style, marker="o", label=label)
        b.plot([r["side"] for r in rows], [r["memory_bytes"] / 2**20 for r in rows], style, marker="o", label=label)
        if mode == "jfb":
            a.plot([r["side"] for r in rows], [r["floor_time_s"] for r in rows], ":", color="gray", label="jfb floor")
    a.set(xlabel="image side (px)", ylabel="time per training step (s)", title=f"batch {payload['config']['batch']}")
    b.set(xlabel="image side (px)", ylabel="memory (MiB)", title=f"{payload['device']}: {payload['config']['memory']}")
    a.legend(fontsize=8)
    save_figure(fig, path)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, every value checked (argparse exits with status 2 and one line naming the argument)."""
    p = argparse.ArgumentParser(prog="python -m jfb_ip.bench.backward", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized: sides 16 32, batch 4, 3 repeats, 1 thread")
    p.add_argument("--sides", type=int_at_least(1), nargs="+", default=None, help="default: 16 32 ... 128")
    p.add_argument("--batch", type=int_at_least(1), default=None, help="default: 16")
    p.add_argument("--modes", nargs="+", default=list(MODES + PEERS), choices=MODES + PEERS)
    p.add_argument("--peer-settings", nargs="+", default=list(SETTINGS), choices=SETTINGS,
                   help="peer rows at the peers' defaults and/or matched to jfb-ip's settings (default: both)")
    p.add_argument("--no-forward", action="store_true", help="skip the forward-solver comparison")
    p.add_argument("--repeats", type=int_at_least(1), default=None, help="timed steps per mode (default 5; paper: 20)")
    p.add_argument("--warmup", type=int_at_least(0), default=None, help="untimed rounds after the first (default 1; quick 0)")
    p.add_argument("--depth", type=int_at_least(2), default=17)
    p.add_argument("--width", type=int_at_least(1), default=64)
    p.add_argument("--tol", type=float_at_least(0.0), default=1e-3)
    p.add_argument("--max-iter", type=int_at_least(1), default=30)
    p.add_argument("--neumann-k", type=int_at_least(0), default=5)
    p.add_argument("--unroll-steps", type=int_at_least(1), default=None, help="default: --max-iter")
    p.add_argument("--phantom-k", type=int_at_least(1), default=5)
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's; quick: 1)")
    p.add_argument("--json", type=output_file, default="outputs/bench/backward.json", help="'' to skip")
    p.add_argument("--png", type=output_file, default="outputs/bench/backward.png", help="'' to skip the plot")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    # quick: one thread, since two threads on a shared 2-core machine ran ~17x slower than one here
    quick = (dict(sides=[16, 32], batch=4, repeats=3, warmup=0, threads=1) if a.quick
             else dict(sides=list(range(16, 129, 16)), batch=16, repeats=5, warmup=1, threads=None))
    reduced = [f"{k}={quick[k]}" for k in quick if getattr(a, k) is None]
    for k, v in quick.items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        print("--quick: reduced " + ", ".join(reduced or ["nothing (all given explicitly)"])
              + f" (full: sides 16..128, batch 16, repeats 5, warmup 1, torch's threads); depth {a.depth}, "
              f"width {a.width}")
    load, cores = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, os.cpu_count() or 1
    if load > cores - 0.5 and (a.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        n = torch.get_num_threads()
        print(f"note: load average {load:.1f} on {cores} cores: CPU timings are unreliable"
              + (f"; {n} threads on busy cores can run many times slower (--threads 1 avoids that)" if n > 1 else ""))
    payload = run(a.sides, a.batch, a.modes, a.repeats, depth=a.depth, width=a.width, tol=a.tol,
                  max_iter=a.max_iter, warmup=a.warmup, device=a.device, seed=a.seed, neumann_k=a.neumann_k,
                  unroll_steps=a.unroll_steps, phantom_k=a.phantom_k, peer_settings=a.peer_settings,
                  forward=not a.no_forward)
    print(f"device: {payload['device']}, tol {a.tol}, max_iter {a.max_iter}, median of {a.repeats} timed steps "
          f"after {1 + a.warmup} untimed")
    report(payload)
    write_outputs(payload, a.json, a.png, plot)
    return payload


if __name__ == "__main__":
    main()
