"""Training memory per method and the largest batch per GPU size (Table 3 of Guan et al. [3]).

Every method is built from its Hydra config exactly as ``train.py`` builds it (``conf/method``,
``conf/backward``, every ``conf/task``) and takes one training step on random images: forward,
MSE loss (plus the stage losses when ``aux_loss`` is on), backward and the configured optimizer's
step (AdamW from ``conf/train.yaml``: two state tensors per parameter). Each point is measured at
two batch sizes b1 < b2 (a fresh model with the same seed each time) and fitted as
memory = fixed_bytes + bytes_per_sample * batch. The largest batch for a budget of 8, 10 or
24 GiB is floor((budget - fixed) / per_sample), reported as in Guan et al. [3]: an even number, or 1,
or None ('-') when one sample does not fit.

What "memory" is:
  CUDA: the peak allocated bytes (``torch.cuda.max_memory_allocated``) during the step above what
     was allocated before the model was moved to the device: weights, buffers, data, activations
     and the no-grad solvers' work buffers, gradients and optimizer state.
  CPU (deterministic): weights and buffers + gradients + optimizer state + the clean batch and its
     measurement + the distinct storages saved for backward (``saved_tensors_hooks``, deduplicated by
     storage address, a tensor counted once whatever its views). Not counted: transient tensors that
     autograd does not keep, in particular everything inside a no-grad solve (Anderson's history, the
     iterates) and the implicit mode's backward Anderson solve, which runs in a tensor hook; that is
     exactly why the DEQ family (degrad with jfb or implicit) is flat in the number of forward
     iterations, while unrolled stages each keep their activations. On CPU max_batch is therefore an
     optimistic bound (no allocator slack, no CUDA context, no solver buffers).

Sweeps: stages K via ``method.stages=K`` for lu_dncnn and luser_dw (luser_sw at K = 8, the paper's);
forward iterations N via ``solver.max_iter=N solver.tol=0 solver.train_tol=0`` for degrad (so exactly N
iterations run; the implicit backward solve then also runs N). The paper's deblurring set-up is
128x128 RGB; its DEQ4IP regulariser is the 17x64 DnCNN (``--paper-sizes`` sets degrad's net to it).
"""
from __future__ import annotations

import argparse
import gc
import math
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F

from .. import config_dir
from ..nets import count_parameters
from .common import (SavedBytes, compose_train, device, int_at_least, output_file, pyplot, save_figure,
                     write_outputs)

CONF = config_dir()
# name -> (method config, backward config or None for the method's own, what the sweep varies)
METHODS = {"lu_dncnn": ("lu_dncnn", None, "stages"), "degrad_jfb": ("degrad", "jfb", "iters"),
           "degrad_implicit": ("degrad", "implicit", "iters"), "luser_sw": ("luser_sw", "jfb", "stages"),
           "luser_dw": ("luser_dw", "jfb", "stages")}
BUDGETS = {"8GB": 8, "10GB": 10, "24GB": 24}  # GiB, as GPU cards are sized
KEYS = ("method", "backward", "task", "params", "iters_or_stages", "bytes_per_sample", "fixed_bytes", "max_batch")


def available_tasks() -> list[str]:
    return sorted(p.stem for p in (CONF / "task").glob("*.yaml"))


def _nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())


def build(name: str, task: str, point: int, channels: int, paper_sizes: bool = False, seed: int = 0):
    """(method, task object, optimizer factory) from the Hydra configs, as train.py composes them."""
    cfg_name, backward, kind = METHODS[name]
    ov = [f"method={cfg_name}", f"task={task}", f"data.channels={channels}"]
    ov += [f"backward={backward}"] if backward else []
    if kind == "stages":
        ov += [f"method.stages={point}"]
    else:  # tol 0 in and out of training (conf/method_task may loosen training's solves): exactly N iterations
        ov += [f"solver.max_iter={point}", "solver.tol=0", "solver.train_tol=0"]
    if paper_sizes and cfg_name == "degrad":
        ov += ["method.net.depth=17", "method.net.width=64"]
    cfg = compose_train(ov)
    torch.manual_seed(seed)
    method = hydra.utils.instantiate(cfg.method, _convert_="all")
    return method, hydra.utils.instantiate(cfg.task), hydra.utils.instantiate(cfg.module.optimizer)


def step_memory(method, task, optimizer, batch: int, size: int, channels: int, device, seed: int = 0):
    """Memory of one training step (see the module docstring) -> (bytes, mean solver iterations)."""
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    method = method.to(device).train()
    g = torch.Generator().manual_seed(seed + batch)
    x = torch.rand(batch, channels, size, size, generator=g).to(device)
    torch.manual_seed(seed)
    meas = task.sample(x)
    opt = optimizer(method.parameters())
    opt.zero_grad(set_to_none=True)
    held = [*method.parameters(), *method.buffers(), x, meas.y]
    # on CUDA no hooks: SavedBytes holds every saved storage until backward ends, which would raise the peak
    with nullcontext() if cuda else SavedBytes(t.untyped_storage().data_ptr() for t in held) as saved:
        rec = method(meas)
        stats = rec.stats
        rec.loss(x, F.mse_loss, method.aux_loss).backward()
    opt.step()
    iters = None if stats is None else float(stats.iterations.float().mean())
    if cuda:
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, iters
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return _nbytes(held) + _nbytes(grads) + _nbytes(state) + saved.nbytes, iters


def max_batch(fixed: float, per_sample: float, gib: float) -> int | None:
    n = math.floor((gib * 2**30 - fixed) / per_sample) if per_sample > 0 else 0
    return None if n < 1 else (1 if n == 1 else n - n % 2)


def run(methods=tuple(METHODS), tasks=None, stages=(2, 4, 8, 16), iters=(10, 25, 50, 75, 100), *, image_size=128,
        channels=3, batches=(2, 4), paper_sizes=False, device=None, seed=0, log=print) -> dict:
    """Measure every (method, task, point); returns ``{"device", "config", "rows"}`` (rows: KEYS + extras)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tasks = list(tasks or available_tasks())
    b1, b2 = batches
    if b2 <= b1:
        raise ValueError(f"batches must be two sizes b1 < b2, got {batches}")
    rows = []
    for name in methods:
        kind = METHODS[name][2]
        points = list(iters) if kind == "iters" else (
            [8 if 8 in stages else max(stages)] if name == "luser_sw" else list(stages))
        for task in tasks:
            for point in points:
                mem, params, solver_iters = [], None, None
                for b in (b1, b2):
                    method, task_obj, optimizer = build(name, task, point, channels, paper_sizes, seed)
                    params = count_parameters(method)
                    m, solver_iters = step_memory(method, task_obj, optimizer, b, image_size, channels, device,
                                                  seed)
                    mem.append(m)
                    del method
                per = (mem[1] - mem[0]) / (b2 - b1)
                fixed = mem[0] - per * b1
                cfg_name, backward, _ = METHODS[name]
                rows.append({"method": cfg_name, "backward": backward or "unroll", "task": task, "params": params,
                             "iters_or_stages": point, "sweep": kind, "bytes_per_sample": int(round(per)),
                             "fixed_bytes": int(round(fixed)), "batches": [b1, b2], "measured_bytes": mem,
                             "solver_iters": solver_iters,
                             "max_batch": {k: max_batch(fixed, per, v) for k, v in BUDGETS.items()}})
                log(f"{name:16s} {task:12s} {kind} {point:4d}: {per / 2**20:9.2f} MiB/sample, "
                    f"fixed {fixed / 2**20:8.2f} MiB")
    config = dict(methods=list(methods), tasks=tasks, stages=list(stages), iters=list(iters), image_size=image_size,
                  channels=channels, batches=[b1, b2], paper_sizes=paper_sizes, seed=seed,
                  budgets_gib=BUDGETS, memory="cuda peak allocated during the step" if device.type == "cuda"
                  else "weights+buffers+grads+optimizer state+data+tensors saved for backward")
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "config": config, "rows": rows}


def _find(rows, method, backward, task, point):
    return next((r for r in rows if (r["method"], r["backward"], r["task"], r["iters_or_stages"])
                 == (method, backward, task, point)), None)


def targets(payload) -> list[str]:
    """The target lines, with the ratios of this run."""
    rows, out = payload["rows"], []
    for task in payload["config"]["tasks"]:
        for bw in ("jfb", "implicit"):
            pts = sorted(r["iters_or_stages"] for r in rows if (r["method"], r["backward"], r["task"]) ==
                         ("degrad", bw, task))
            if len(pts) >= 2:
                hi, lo = (_find(rows, "degrad", bw, task, p)["bytes_per_sample"] for p in (pts[-1], pts[0]))
                out.append(f"DEQ ({bw}, {task}) memory at {pts[-1]} iterations / at {pts[0]} = {hi / lo:.3f} "
                           f"(target <= 1.05)")
        ks = sorted({r["iters_or_stages"] for r in rows if r["method"] == "luser_dw" and r["task"] == task}
                    & {r["iters_or_stages"] for r in rows if r["method"] == "lu_dncnn" and r["task"] == task})
        if ks:
            k = 8 if 8 in ks else ks[-1]
            dw, lu = _find(rows, "luser_dw", "jfb", task, k), _find(rows, "lu_dncnn", "unroll", task, k)
            out.append(f"LUSER-DW per-sample memory / LU-DnCNN at K={k} ({task}) = "
                       f"{dw['bytes_per_sample'] / lu['bytes_per_sample']:.3f} (target <= 0.20)")
    return out


def report(payload, log=print) -> None:
    head = (f"{'method':<10}{'backward':<10}{'task':<12}{'params':>10}{'iters/K':>8}{'bytes_per_sample':>18}"
            f"{'fixed_bytes':>14}" + "".join(f"{k:>7}" for k in BUDGETS))
    log(head)
    for r in payload["rows"]:
        mb = "".join(f"{'-' if r['max_batch'][k] is None else r['max_batch'][k]:>7}" for k in BUDGETS)
        log(f"{r['method']:<10}{r['backward']:<10}{r['task']:<12}{r['params']:>10,}{r['iters_or_stages']:>8}"
            f"{r['bytes_per_sample']:>18,}{r['fixed_bytes']:>14,}{mb}")
    for line in targets(payload):
        log(line)


def plot(payload, path) -> bool:
    plt = pyplot(path)
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    task = payload["config"]["tasks"][0]
    for ax, kind, xlabel in zip(axes, ("stages", "iters"), ("unrolled stages K", "forward iterations N (tol 0)")):
        top = 0.0
        for key in dict.fromkeys((r["method"], r["backward"]) for r in payload["rows"] if r["sweep"] == kind):
            rs = sorted((r for r in payload["rows"] if (r["method"], r["backward"]) == key and r["task"] == task),
                        key=lambda r: r["iters_or_stages"])
            ys = [r["bytes_per_sample"] / 2**20 for r in rs]
            ax.plot([r["iters_or_stages"] for r in rs], ys, marker="o" if len(rs) > 1 else "s", markersize=8,
                    label=f"{key[0]} ({key[1]})")
            top = max([top, *ys])
        ax.set(xlabel=xlabel, ylabel="training memory per sample (MiB)", ylim=(0, 1.15 * top or 1))
        ax.legend(fontsize=8)
    c = payload["config"]
    fig.suptitle(f"{payload['device']}, {task}, {c['channels']}x{c['image_size']}x{c['image_size']}", fontsize=9)
    save_figure(fig, path)
    return True


def task_channels(task: str) -> int | None:
    """The channel count a task config fixes (the gray tasks: 1), or None (the data's: an interpolation)."""
    from omegaconf import OmegaConf

    channels = OmegaConf.to_container(OmegaConf.load(CONF / "task" / f"{task}.yaml")).get("channels")
    return channels if isinstance(channels, int) else None


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, every value checked (argparse exits with status 2 and one line naming the argument)."""
    p = argparse.ArgumentParser(prog="python -m jfb_ip.bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized run: 32x32, K 2 4 8, N 10 50 100, batches 1 2, 1 thread")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--tasks", nargs="+", default=["deblur"], choices=available_tasks(),
                   help="default: deblur (memory in Table 3 of Guan et al. [3] does not depend on the "
                        "operator); the gray tasks (ct, mri4x, mri8x) need --channels 1")
    p.add_argument("--stages", type=int_at_least(1), nargs="+", default=None, help="K for lu_dncnn/luser_dw (default 2 4 8 16)")
    p.add_argument("--iters", type=int_at_least(1), nargs="+", default=None, help="N for degrad (default 10 25 50 75 100)")
    p.add_argument("--image-size", type=int_at_least(8), default=None, help="default 128 (Guan et al. [3]), quick 32")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--batches", type=int_at_least(1), nargs=2, default=None,
                   help="the two fitted batch sizes, b1 < b2 (default 2 4)")
    p.add_argument("--paper-sizes", action=argparse.BooleanOptionalAction, default=None,
                   help="degrad's DnCNN at 17x64 as DEQ4IP (default: on, off with --quick: the config's)")
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch CPU threads (default: torch's; --quick on CPU: 1, small convs crawl on busy cores)")
    p.add_argument("--json", type=output_file, default="outputs/bench/memory.json", help="'' to skip")
    p.add_argument("--png", type=output_file, default="outputs/bench/memory.png", help="'' to skip the plot")
    a = p.parse_args(argv)
    if a.batches is not None and a.batches[0] >= a.batches[1]:
        p.error(f"argument --batches: the two batch sizes must increase (b1 < b2), got {a.batches[0]} {a.batches[1]}")
    gray = {t: c for t in a.tasks if (c := task_channels(t)) is not None and c != a.channels}
    if gray:
        p.error(f"argument --channels: {a.channels} channels, but task(s) {sorted(gray)} take "
                f"{sorted(set(gray.values()))} (give --channels 1 for the gray tasks, and run them apart)")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads or (a.quick and (a.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"):
        torch.set_num_threads(a.threads or 1)  # the counted bytes do not depend on it
    defaults = (dict(stages=[2, 4, 8], iters=[10, 50, 100], image_size=32, batches=[1, 2], paper_sizes=False)
                if a.quick else dict(stages=[2, 4, 8, 16], iters=[10, 25, 50, 75, 100], image_size=128,
                                     batches=[2, 4], paper_sizes=True))
    for k, v in defaults.items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    payload = run(a.methods, a.tasks, a.stages, a.iters, image_size=a.image_size, channels=a.channels,
                  batches=a.batches, paper_sizes=a.paper_sizes, device=a.device, seed=a.seed)
    c = payload["config"]
    print(f"device: {payload['device']}; {c['channels']}x{a.image_size}x{a.image_size} images; batches {a.batches}; "
          f"memory = {c['memory']}; max batch per GiB budget (even, or 1, '-' if none)")
    report(payload)
    write_outputs(payload, a.json, a.png, plot)
    return payload


if __name__ == "__main__":
    main()
