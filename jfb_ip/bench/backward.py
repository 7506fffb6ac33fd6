"""Cost of one training step per backward mode as the image side grows (Fig. 2 of paper 000).

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

Peer rows (torchdeq_jfb, torchdeq_implicit) use torchdeq's Anderson with the same tolerance
(relative stop mode), cap and forward memory m = 5; its backward Anderson keeps torchdeq's own
m = 6 and absolute regulariser lam = 1e-4 (not settable through get_deq), which stalls when the
incoming gradient is small: compare bwd_iters and bwd_residual along with the times.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..methods import DEGRAD
from ..methods.base import fixed_weights
from ..nets.dncnn import DnCNN
from ..physics import Deblur
from ..solvers import FORWARD_SOLVERS
from .common import SavedBytes, pyplot, save_figure, write_outputs

MODES = ("jfb", "implicit", "neumann", "unroll", "phantom")
PEERS = ("torchdeq_jfb", "torchdeq_implicit")
KEYS = ("mode", "side", "batch", "time_s", "time_ratio_to_jfb", "memory_bytes", "memory_ratio_to_jfb", "fwd_iters",
        "bwd_iters", "grad_cos_to_implicit", "fwd_tol", "bwd_tol", "bwd_residual", "floor_time_s")


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


def _torchdeq(method, meas, ift, tol, max_iter):
    """torchdeq's DEQ (one-step grad, or IFT by its autograd.Function) on the same DE-GRAD map; the
    whole step runs with the weights cached, since its IFT re-evaluates f(z*) during backward."""
    from torchdeq import get_deq
    deq = get_deq(core="sliced", f_solver="anderson", f_max_iter=max_iter, f_tol=tol, f_stop_mode="rel",
                  b_solver="anderson", b_max_iter=max_iter, b_tol=tol, b_stop_mode="rel", ift=ift, grad=1)

    def forward():
        bwd = {}
        z0 = meas.init()
        eta = method.step_size(meas, z0)
        zs, info = deq(lambda z: method.T(z, meas, eta), z0, solver_kwargs={"m": 5},
                       backward_writer=bwd.update)
        return zs[-1], lambda: (_mean(info["nstep"]), _mean(bwd.get("nstep")), _max(bwd.get("rel_lowest")))
    return forward, lambda: fixed_weights(method)


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
        device=None, seed=0, neumann_k=5, unroll_steps=None, phantom_k=5, phantom_damping=0.5, log=print) -> dict:
    """Benchmark every mode at every side; returns the JSON payload ``{"device", "config", "skipped", "rows"}``.

    Per side: one untimed round (memory, gradient, iteration counts; it also warms up), ``warmup``
    more untimed rounds, then ``repeats`` timed rounds; every round runs each mode once, in turn."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unroll_steps = unroll_steps or max_iter
    skipped = []
    if any(m in PEERS for m in modes) and importlib.util.find_spec("torchdeq") is None:
        skipped = [m for m in modes if m in PEERS]
        modes = [m for m in modes if m not in PEERS]
        log("peer rows skipped: torchdeq not installed")
    options = {"implicit": {"backward_solver": "anderson", "backward_tol": tol, "backward_max_iter": max_iter},
               "neumann": {"neumann_k": neumann_k}, "unroll": {"unroll_steps": unroll_steps},
               "phantom": {"phantom_k": phantom_k, "phantom_damping": phantom_damping}}
    solver = {"name": "anderson", "tol": tol, "max_iter": max_iter}
    task = Deblur(9, 5.0, 0.01)
    torch.manual_seed(seed)
    template = DEGRAD(DnCNN(3, depth=depth, width=width, spectral_norm=True, gamma=0.99),
                      solver=solver, backward={"mode": "jfb"}).to(device)
    init = copy.deepcopy(template.state_dict())
    names = list(modes) + (["floor"] if "jfb" in modes else [])
    out = []
    for side in sides:
        g = torch.Generator().manual_seed(seed + side)
        x = torch.rand(batch, 3, side, side, generator=g).to(device)
        meas = task.sample(x, generator=torch.Generator(device=device).manual_seed(seed + side))
        rows = {}
        for name in names:
            mode = name if name in MODES else "jfb"
            method = DEGRAD(DnCNN(3, depth=depth, width=width, spectral_norm=True, gamma=0.99), solver=solver,
                            backward={"mode": mode, **options.get(mode, {})}).to(device)
            if name in MODES:
                forward, context = _ours(method, meas)
            elif name == "floor":
                forward, context = _floor(method, meas, tol, max_iter)
            else:
                forward, context = _torchdeq(method, meas, name == "torchdeq_implicit", tol, max_iter)
            rows[name] = {"method": method, "init": init, "opt": torch.optim.Adam(method.parameters(), lr=1e-4),
                          "forward": forward, "context": context, "times": []}
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
        for name in modes:
            r = rows[name]
            fwd, bwd, bres = r["info"]
            out.append({
                "mode": name, "side": side, "batch": batch, "time_s": t[name],
                "time_ratio_to_jfb": t[name] / t["jfb"] if "jfb" in t else None,
                "memory_bytes": int(r["mem"]),
                "memory_ratio_to_jfb": r["mem"] / rows["jfb"]["mem"] if "jfb" in rows else None,
                "fwd_iters": fwd, "bwd_iters": bwd,
                "grad_cos_to_implicit": None if ref is None else float(F.cosine_similarity(r["grad"], ref, dim=0)),
                "fwd_tol": tol, "bwd_tol": tol if name in ("implicit", "torchdeq_implicit") else None,
                "bwd_residual": bres, "floor_time_s": t["floor"] if name == "jfb" else None})
        log(f"side {side}: " + ", ".join(f"{n} {t[n]:.3f}s" for n in names))
    config = dict(sides=list(sides), batch=batch, modes=list(modes), repeats=repeats, warmup=warmup, depth=depth,
                  width=width, tol=tol, max_iter=max_iter, neumann_k=neumann_k, unroll_steps=unroll_steps,
                  phantom_k=phantom_k, phantom_damping=phantom_damping, threads=torch.get_num_threads(),
                  memory="cuda peak allocated above the step's start" if device.type == "cuda"
                  else "bytes of tensors saved for backward")
    return {"device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "config": config, "skipped": skipped, "rows": out}


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


COLUMNS = (("mode", "mode", "<18", "s"), ("side", "side", ">5", "d"), ("batch", "batch", ">6", "d"),
           ("time_s", "time_s", ">9", ".4f"), ("x jfb", "time_ratio_to_jfb", ">7", ".2f"),
           ("memory_bytes", "memory_bytes", ">14", "d"), ("x jfb", "memory_ratio_to_jfb", ">7", ".2f"),
           ("fwd_it", "fwd_iters", ">7", ".1f"), ("bwd_it", "bwd_iters", ">7", ".1f"),
           ("bwd_res", "bwd_residual", ">9", ".1e"), ("cos_impl", "grad_cos_to_implicit", ">10", ".6f"),
           ("floor_s", "floor_time_s", ">9", ".4f"))


def report(payload, log=print) -> None:
    """The table and the target lines."""
    log("".join(format(head, align) for head, _, align, _ in COLUMNS))
    for r in payload["rows"]:
        log("".join(format(_fmt(r[key], spec), align) for _, key, align, spec in COLUMNS))
    by = {(r["mode"], r["side"]): r for r in payload["rows"]}
    sides = sorted({r["side"] for r in payload["rows"]})
    for ours, peer in (("jfb", "torchdeq_jfb"), ("implicit", "torchdeq_implicit")):
        for s in sides:
            if (ours, s) in by and (peer, s) in by:
                log(f"ours / peer: {ours} / {peer} at side {s} = {by[ours, s]['time_s'] / by[peer, s]['time_s']:.2f}")
    top = sides[-1]
    floor = [(by["jfb", s]["time_s"] / by["jfb", s]["floor_time_s"], s) for s in sides if ("jfb", s) in by]
    if floor:
        worst = max(floor)
        log(f"jfb / floor = {worst[0]:.2f} (target <= 1.10)  [worst side {worst[1]}; all: "
            + ", ".join(f"{s}: {v:.2f}" for v, s in floor) + "]")
    if ("implicit", top) in by and ("torchdeq_implicit", top) in by:
        log(f"implicit / torchdeq_implicit at side {top} = "
            f"{by['implicit', top]['time_s'] / by['torchdeq_implicit', top]['time_s']:.2f} (target <= 1.0)")
    else:
        log("implicit / torchdeq_implicit: skipped: " + ("torchdeq not installed" if payload["skipped"]
                                                        else "mode not run"))
    if ("implicit", top) in by and ("jfb", top) in by:
        log(f"implicit / jfb = {by['implicit', top]['time_s'] / by['jfb', top]['time_s']:.2f}  [side {top}]")


def plot(payload, path) -> bool:
    plt = pyplot(path)
    if plt is None:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(r["mode"] for r in payload["rows"]):
        rows = [r for r in payload["rows"] if r["mode"] == mode]
        style = "--" if mode.startswith("torchdeq") else "-"
        a.plot([r["side"] for r in rows], [r["time_s"] for r in rows], style, marker="o", label=mode)
        b.plot([r["side"] for r in rows], [r["memory_bytes"] / 2**20 for r in rows], style, marker="o", label=mode)
        if mode == "jfb":
            a.plot([r["side"] for r in rows], [r["floor_time_s"] for r in rows], ":", color="gray", label="jfb floor")
    a.set(xlabel="image side (px)", ylabel="time per training step (s)", title=f"batch {payload['config']['batch']}")
    b.set(xlabel="image side (px)", ylabel="memory (MiB)", title=f"{payload['device']}: {payload['config']['memory']}")
    a.legend(fontsize=8)
    save_figure(fig, path)
    return True


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jfb_ip.bench.backward", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized: sides 16 32, batch 4, 3 repeats, 1 thread")
    p.add_argument("--sides", type=int, nargs="+", default=None, help="default: 16 32 ... 128")
    p.add_argument("--batch", type=int, default=None, help="default: 16")
    p.add_argument("--modes", nargs="+", default=list(MODES + PEERS), choices=MODES + PEERS)
    p.add_argument("--repeats", type=int, default=None, help="timed steps per mode (default 5; paper: 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds after the first (default 1; quick 0)")
    p.add_argument("--depth", type=int, default=17)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-iter", type=int, default=30)
    p.add_argument("--neumann-k", type=int, default=5)
    p.add_argument("--unroll-steps", type=int, default=None, help="default: --max-iter")
    p.add_argument("--phantom-k", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; quick: 1)")
    p.add_argument("--json", default="outputs/bench/backward.json")
    p.add_argument("--png", default="outputs/bench/backward.png", help="'' to skip the plot")
    a = p.parse_args(argv)
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
                  unroll_steps=a.unroll_steps, phantom_k=a.phantom_k)
    print(f"device: {payload['device']}, tol {a.tol}, max_iter {a.max_iter}, median of {a.repeats} timed steps "
          f"after {1 + a.warmup} untimed")
    report(payload)
    write_outputs(payload, a.json, a.png, plot)
    return payload


if __name__ == "__main__":
    main()
