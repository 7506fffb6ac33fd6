"""TV's weight per task, chosen on the validation split, and TV's test row.

    python -m jfb_ip.bench.tv_weights [--tasks deblur inpaint ...] [--write] [--json <file>] [override ...]

For every task, builds ``method=tv task=<t>`` exactly as ``evaluate.py`` does (the task's data: natural photos,
phantoms for CT and MRI; the seeded validation and test measurements ``train.py`` makes), then:

1. searches the weight on the validation split: mean PSNR over the split, hill-climbing on a log grid in half
   decades from 10^-2.5, then refined to quarter and eighth decades around the best (unimodal in practice; 6-8
   solves instead of a 13-point grid); every solve after the first starts from the solution of the nearest weight
   already solved;
2. tests the chosen weight on the test split.

Prints one markdown table: the weight, test PSNR/SSIM, the fraction of test samples that reached the solver's
tolerance, mean/max iterations and the seconds of search and test. ``--write`` stores each weight in
``conf/tv_weights/<task>_<data>.yaml`` (``tv_weight``), which ``method=tv`` then uses without a search, the TV
row of ``train.py``'s test table uses, and DE-GRAD's TV initializers start from. Overrides (``method.tol=1e-4``,
``data=celeba data.root=<dir>``) apply to every task; the data group's option names the stored file.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .. import tv_weight_path
from ..lit.calibration import image_metrics, psnr_score
from ..lit.run import build_module, tv_weight_data
from .common import compose_train, finish_rows, module_groups, seeded_split_batch

TASKS = ("deblur", "inpaint", "sr2", "sr4", "ct", "mri4x", "mri8x")
# log10 of the first weight and the search's steps (decades)
START, STEPS = -2.5, (0.5, 0.25, 0.125)
LOG_RANGE = (-5.0, 0.0)


def search(solve, x_val: torch.Tensor) -> tuple[float, dict[float, float]]:
    """The log10 weight of best mean validation PSNR: ``solve(lam, x0) -> x_hat``; returns (log10 lam, scores)."""
    scores: dict[float, float] = {}
    sols: dict[float, torch.Tensor] = {}

    def score(e: float) -> float:
        e = round(min(max(e, LOG_RANGE[0]), LOG_RANGE[1]), 4)
        if e not in scores:
            near = min(sols, key=lambda k: abs(k - e)) if sols else None
            x = solve(10 ** e, None if near is None else sols[near])
            sols[e], scores[e] = x, psnr_score(x, x_val).double().mean().item()
        return scores[e]

    best = START
    for step in STEPS:
        while True:
            cand = [best - step, best, best + step]
            vals = [score(e) for e in cand]
            nxt = cand[max(range(3), key=vals.__getitem__)]
            if nxt == best or not LOG_RANGE[0] <= nxt <= LOG_RANGE[1]:
                break
            best = nxt
    return best, scores


def run_task(task: str, overrides: list[str]) -> dict:
    cfg = compose_train([f"task={task}", "method=tv", "logger=none", *overrides], return_hydra_config=True)
    data = cfg.hydra.runtime.choices.data
    groups = module_groups(cfg)
    groups.method.lambda_grid = []
    module = build_module(groups)
    method = module.method
    x_val, meas_val = seeded_split_batch(groups.data, module, "val")
    x_test, meas_test = seeded_split_batch(groups.data, module, "test")
    from ..methods.tv import tv_solve

    def solve(meas, lam, x0=None):
        return tv_solve(meas, lam, method.tol, method.max_iter, method.splitting,
                        x0=method.start(meas) if x0 is None else x0)

    t0 = time.perf_counter()
    with torch.no_grad():
        e, scores = search(lambda lam, x0: solve(meas_val, lam, x0)[0], x_val)
        t1 = time.perf_counter()
        lam = float(f"{10 ** e:.3g}")
        x_hat, stats = solve(meas_test, lam)
    t2 = time.perf_counter()
    psnr, ssim = image_metrics(x_hat, x_test)
    it = stats.iterations.double()
    return {"task": task, "data": data, "task_cfg": OmegaConf.to_container(cfg.task, resolve=True),
            "data_cfg": tv_weight_data(cfg.data), "lam": lam,
            "val_psnr": max(scores.values()), "n_solves_val": len(scores),
            "psnr": psnr.mean().item(), "ssim": ssim.mean().item(), "converged": stats.converged.double().mean().item(),
            "iters_mean": it.mean().item(), "iters_max": int(it.max()), "seconds_search": t1 - t0,
            "seconds_test": t2 - t1, "n_test": int(x_test.shape[0]), "tol": method.tol, "max_iter": method.max_iter}


def write_weight(row: dict, command: str) -> Path:
    """``tv_weight: <lam>``, ``tv_weight_task`` (the task settings it was chosen for) and, for generated data,
    ``tv_weight_data`` (the phantoms' style) into ``conf/tv_weights/<task>_<data>.yaml``, with the test row and the
    command."""
    path = tv_weight_path(row["task"], row["data"])
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        "# @package _global_\n"
        f"# TV's weight on task={row['task']} data={row['data']}, chosen on the validation split by\n"
        f"# {command}\n"
        f"# (test: {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}, {row['converged']:.0%} converged, "
        f"{row['iters_mean']:.0f} iterations on average).\n"
        f"tv_weight: {row['lam']:.3g}\n"
        "# the task settings it was chosen for: a run whose task differs drops it (jfb_ip.lit.run.check_tv_weight_task)\n"
        + OmegaConf.to_yaml({"tv_weight_task": row["task_cfg"]})
        + ("# the data settings it was chosen for: a run on other data drops it too\n"
           + OmegaConf.to_yaml({"tv_weight_data": row["data_cfg"]}) if row.get("data_cfg") else ""))
    return path


def table(rows: list[dict]) -> str:
    lines = ["| task | lam | PSNR | SSIM | converged | iterations mean / max | s search + test |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['lam']:.3g} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['converged']:.2f} | "
                     f"{r['iters_mean']:.0f} / {r['iters_max']} | "
                     f"{r['seconds_search']:.0f} + {r['seconds_test']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jfb_ip.bench.tv_weights", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--write", action="store_true", help="store each weight in conf/tv_weights/<task>_<data>.yaml")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every task (method.tol=1e-4, ...)")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for task in args.tasks:
        row = run_task(task, args.overrides)
        rows.append(row)
        if args.write:
            # a local data path is the user's, not the config's
            shown = [o.split("=")[0] + "=<dir>" if o.startswith("data.root=") else o for o in args.overrides]
            write_weight(row, " ".join(["python -m jfb_ip.bench.tv_weights", f"--tasks {task}", "--write", *shown]))
        print(table([row]).splitlines()[-1], flush=True)
    return finish_rows(rows, table, args.json)


if __name__ == "__main__":
    main()
