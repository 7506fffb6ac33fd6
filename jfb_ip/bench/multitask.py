"""Willingham et al. [4], Tables I-II, on embedded images: does the MTDEQ prior beat a Gaussian denoiser in PnP-ADMM?

    python -m jfb_ip.bench.multitask [--quick] [--json <file>] [--png <file>] [--out <dir>]
        [--denoiser-ckpt <ckpt>] [--mtdeq-ckpt <ckpt>] [--mtdeq-steps <n>] [--mtdeq-lr <lr>] [--no-degrad]
        [--tune-each-prior]
        [override ...]

1. Trains (or loads: ``--denoiser-ckpt``) the noise-conditioned UNet as a Gaussian denoiser (``method=denoiser
   task=denoise``), then trains (or loads: ``--mtdeq-ckpt``) the MTDEQ prior (``method=mtdeq task=multitask``,
   [4] Alg. 1) initialised from that denoiser, as §III-B of [4] does ("pre-trained as a Gaussian
   denoiser"); both through ``train.py``'s code path, each in its own run directory inside the bench run's new
   ``<--out>/runs/<timestamp>/``.
2. Evaluates on the held-out embedded test crops the tasks of Tables I-II of [4]: completion with 80% and 90%
   of the pixels dropped (no noise), Gaussian deblurring with blur std 1.6 and 2.0 (noise 0.01), bicubic
   super-resolution x2 and x3 (noise 0 and 0.01). Rows: TV (its lambda searched on each problem's validation
   crops), PnP-ADMM with the Gaussian denoiser, PnP-ADMM with the MTDEQ prior (the same ``method=pnp_admm`` config,
   schedule and iterations for both priors: only the checkpoint differs, as in [4] §III-C; ``--tune-each-prior``
   chooses each prior's own schedule and lam on the validation crops, as TV's weight is), DE-GRAD trained on each
   task (skipped with ``--no-degrad``; ``--quick`` skips it), and "MTDEQ - Gauss", the gain of the MTDEQ prior.
3. Prints the table (PSNR; SSIM in the JSON), writes JSON rows ``{method, task, psnr, ssim}`` and a PNG.

Every evaluation runs like ``train.py`` of a method with nothing to train (validation for what is tuned there,
then the seeded test split), in this process; every training run is a ``train.py`` run. Overrides given at the end
apply to every run (e.g. ``data=folder data.root=<dir>``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..lit.calibration import psnr_score
from ..lit.run import build_module, train
from .common import (compose_train, existing_file, float_at_least, fresh_run_dir, int_at_least, module_groups,
                     output_dir, output_file, pyplot, save_figure, seeded_split_batch, write_outputs)

# Tables I-II of [4]: name -> task overrides (the blur kernel: 15 x 15, as task=multitask's, +-3.5 std at 2.0).
# Completion: PnP-ADMM starts from the normalized-convolution fill (conf/method_task/pnp_admm_inpaint.yaml: from y
# with its dropped pixels at 0, its first denoiser step sees an image 80-90% black); MTDEQ's own FB rows start from
# y, as MTDEQ was trained.
TASKS = {
    "comp80": ["task=inpaint", "task.p_drop=0.8", "task.noise_std=0.0"],
    "comp90": ["task=inpaint", "task.p_drop=0.9", "task.noise_std=0.0"],
    "blur1.6": ["task=deblur", "task.kernel_size=15", "task.variance=2.56", "task.noise_std=0.01"],
    "blur2.0": ["task=deblur", "task.kernel_size=15", "task.variance=4.0", "task.noise_std=0.01"],
    "sr2_n0": ["task=sr2", "task.noise_std=0.0"],
    "sr2_n.01": ["task=sr2", "task.noise_std=0.01"],
    "sr3_n0": ["task=sr2", "task.factor=3", "task.noise_std=0.0"],
    "sr3_n.01": ["task=sr2", "task.factor=3", "task.noise_std=0.01"],
}
# Willingham et al. [4] Tables I-II, "Proposed vs. Gauss" (Set5; bicubic SR columns of Table II)
PAPER_GAIN = {"comp80": 0.52, "comp90": 0.89, "blur1.6": 0.76, "blur2.0": 0.95, "sr2_n0": 0.41, "sr2_n.01": 0.63,
              "sr3_n0": 0.61, "sr3_n.01": 0.76}
ROWS = ("measurement", "tv", "pnp_gauss", "pnp_mtdeq", "fb_gauss", "fb_mtdeq", "degrad", "mtdeq_minus_gauss")

# budgets: steps, image sizes, batch sizes, the UNet (the same for the denoiser and MTDEQ, so the denoiser's weights
# initialise MTDEQ) and MTDEQ's solver and learning rate. MTDEQ's fixed points are found by Anderson here, not by the
# paper's plain FB iteration (conf/method/mtdeq.yaml's default): the same fixed points at about a third of the
# iterations (measured on multitask test crops with the denoiser as Q: 10.6 vs 32 iterations on average, PSNR
# within 0.02 dB). The learning rate fine-tunes a pre-trained prior: [4]'s Adam at 1e-5 (at train.py's 1e-3, 20 steps
# from a 300-step denoiser ended at 20.95 dB on 8 multitask test crops, 40 steps at 1e-4 at 25.31 dB; Wiener 25.03).
# From the 5000-step denoiser, --quick --tune-each-prior put MTDEQ inside PnP-ADMM +0.93 / +0.98 / +1.05 dB over TV
# on average at 1e-4 / 3e-5 / 1e-5 (docs/results.md, 'MTDEQ and PnP priors').
# Full: about 2 hours on 2 cores (docs/benchmarks.md, "Multi-task priors"); --quick: under 20 minutes on 2 cores.
# PnP-ADMM's schedule (iterations, last denoiser strength) is chosen per task on the validation crops for the
# Gaussian prior at lam = 0.23 (``pnp_schedule``); the PnP lam search (``lam_search``) then runs for the Gaussian prior
# too; the MTDEQ prior gets both unchanged ([4] §III-C), or its own search with --tune-each-prior. FB rows: MTDEQ's
# own scheme, capped at ``fb_max_iter``.
FULL = {"denoiser_steps": 3000, "mtdeq_steps": 600, "degrad_steps": 300, "train_size": 48, "mtdeq_size": 24,
        "test_size": 48, "batch": 8, "mtdeq_batch": 2, "problems": 5, "eval_crops": 32, "mtdeq_lr": 1e-5,
        "mtdeq_solver": ["solver=anderson"], "net": [], "lam_search": True, "fb_max_iter": 350,
        "pnp_schedules": [(n, s) for n in (8, 30, 100) for s in (None, 0.01, 0.03, 0.05)], "fb_rows": True}
# --quick's schedules: sigma_min = 0.05 is the best on the validation crops for noiseless completion and SR x2 with
# the 2500-step denoiser (+0.17 to +0.22 dB on completion, +0.05 to +0.07 on SR x2, at 60 / 8 iterations); blur keeps
# the noise level or 0.03. --quick caps MTDEQ's training solves at 100 Anderson iterations (a few multitask problems
# take 350 at the full cap: 2-7 s per step on 2 cores; with the cap, 60 steps took 89 s and the whole --quick run
# 348 s at 8 crops)
QUICK = {"denoiser_steps": 1500, "mtdeq_steps": 160, "degrad_steps": 0, "train_size": 24, "mtdeq_size": 24,
         "test_size": 48, "batch": 8, "mtdeq_batch": 2, "problems": 5, "eval_crops": 16, "mtdeq_lr": 1e-5,
         "mtdeq_solver": ["solver=anderson", "solver.max_iter=100"], "net": [], "lam_search": False, "fb_max_iter": 100,
         "pnp_schedules": [(n, s) for n in (8, 60) for s in (None, 0.03, 0.05)], "fb_rows": False}


def run(overrides: list[str], run_dir: Path) -> dict:
    """One ``train.py`` run in this process (its run directory ``run_dir``, new: inside :func:`fresh_run_dir`'s
    directory of this bench run) -> metrics.json."""
    cfg = compose_train([*overrides, "logger=csv", "trainer.enable_progress_bar=false", f"paths.output_dir={run_dir}",
                         "trainer.check_val_every_n_epoch=1000"])  # validated once, at the end
    return train(cfg)


def _data(size: int, crops: int, batch: int) -> list[str]:
    return [f"data.image_size={size}", f"data.batch_size={batch}", f"data.eval_batch_size={min(crops, 16)}",
            f"data.dataset.eval_crops={crops}"]


def train_priors(b: dict, out: Path, extra: list[str], denoiser_ckpt: str | None, mtdeq_ckpt: str | None) -> dict:
    """Train (or take) the Gaussian denoiser and the MTDEQ prior initialised from it -> their checkpoints."""
    info: dict = {}
    if denoiser_ckpt is None:
        t0 = time.perf_counter()
        run(["method=denoiser", "task=denoise", *b["net"], f"trainer.max_steps={b['denoiser_steps']}",
             *_data(b["train_size"], b["eval_crops"], b["batch"]), *extra], out / "denoiser")
        denoiser_ckpt = str(out / "denoiser" / "checkpoints" / "last.ckpt")
        info["denoiser_train_s"] = time.perf_counter() - t0
        print(f"denoiser trained in {info['denoiser_train_s']:.0f} s", flush=True)
    if mtdeq_ckpt is None:
        t0 = time.perf_counter()
        payload = run(["method=mtdeq", "task=multitask", *b["net"], *b["mtdeq_solver"],
                       f"method.init_from={denoiser_ckpt}", f"task.problems_per_image={b['problems']}",
                       f"module.optimizer.lr={b['mtdeq_lr']}", f"trainer.max_steps={b['mtdeq_steps']}",
                       *_data(b["mtdeq_size"], b["eval_crops"], b["mtdeq_batch"]), *extra], out / "mtdeq")
        mtdeq_ckpt = str(out / "mtdeq" / "checkpoints" / "last.ckpt")
        info["mtdeq_train_s"] = time.perf_counter() - t0
        info["mtdeq_train"] = payload.get("train")
        info["mtdeq_test_multitask"] = {k: payload.get("test", {}).get(k) for k in ("measurement", "wiener", "model",
                                                                                     "solver")}
        print(f"MTDEQ trained in {info['mtdeq_train_s']:.0f} s", flush=True)
    info.update(denoiser_ckpt=denoiser_ckpt, mtdeq_ckpt=mtdeq_ckpt)
    return info


def _schedule(n_iter: int, sigma_min: float | None) -> list[str]:
    return [f"method.n_iter={n_iter}", f"method.sigma_min={'null' if sigma_min is None else sigma_min}"]


def pnp_schedule(b: dict, task_ov: list[str], ckpt: str, extra: list[str]) -> tuple[list[str], dict]:
    """The PnP-ADMM schedule of ``b['pnp_schedules']`` with the best mean PSNR on the validation crops for the prior
    ``ckpt`` at lam = 0.23 (DPIR's): its overrides and every candidate's score. Test images are never seen."""
    sub = module_groups(compose_train(["method=pnp_admm", f"method.denoiser.path={ckpt}", "method.lambda_grid=[]",
                                       *task_ov, *_data(b["test_size"], b["eval_crops"], b["batch"]), "logger=none",
                                       *extra]))
    module = build_module(sub)
    x, meas = seeded_split_batch(sub.data, module, "val")  # exactly the module's validation draws
    method, scores = module.method, {}
    for n_iter, sigma_min in b["pnp_schedules"]:
        method.n_iter, method.sigma_min = n_iter, sigma_min
        with torch.no_grad():
            scores[(n_iter, sigma_min)] = psnr_score(method(meas).x, x).mean().item()
    best = max(scores, key=scores.get)
    return _schedule(*best), {f"n_iter={n} sigma_min={s}": v for (n, s), v in scores.items()}


def evaluate_rows(b: dict, out: Path, extra: list[str], ckpts: dict, degrad: bool,
                  tune_each_prior: bool = False) -> list[dict]:
    """Every row on every task -> JSON rows {method, task, psnr, ssim} (+ wall time, solver stats, lambda).

    By default the MTDEQ prior runs with the schedule and lam chosen for the Gaussian prior ([4] §III-C: the
    reference's best hyper-parameters), which isolates the prior's effect. ``tune_each_prior``: each prior gets the
    schedule and lam best for itself on the validation crops, the protocol of the TV row, for a comparison of each
    method at its best."""
    rows: list[dict] = []
    data = _data(b["test_size"], b["eval_crops"], b["batch"])
    fb = ["method=mtdeq", "train=false", *b["net"], *b["mtdeq_solver"], f"solver.max_iter={b['fb_max_iter']}"]
    priors = {"pnp_gauss": ckpts["denoiser_ckpt"], "pnp_mtdeq": ckpts["mtdeq_ckpt"]}
    for task, task_ov in TASKS.items():
        schedules = {}
        for name in priors if tune_each_prior else ["pnp_gauss"]:
            t0 = time.perf_counter()
            schedules[name] = pnp_schedule(b, task_ov, priors[name], extra)
            print(f"{task:<10} PnP schedule (best for {name} on val): {' '.join(schedules[name][0])} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        schedules.setdefault("pnp_mtdeq", schedules["pnp_gauss"])
        # [] searches lam on the validation crops; the MTDEQ prior takes the Gaussian prior's unless tuned itself
        keep = ["method.lambda_grid=[]"]
        search = {"pnp_gauss": [] if b["lam_search"] or tune_each_prior else keep,
                  "pnp_mtdeq": [] if tune_each_prior else keep}
        # TV's weight searched on these validation crops: conf/tv_weights/ stores one for each task's default
        # parameters, not for these blurs, noise levels and drop rates
        methods = {"tv": ["method=tv", "method.lam=null"],
                   **{name: ["method=pnp_admm", f"method.denoiser.path={ckpt}", *schedules[name][0], *search[name]]
                      for name, ckpt in priors.items()}}
        if b["fb_rows"]:  # each prior inside MTDEQ's own training scheme (forward-backward, eq. (3)), no training
            methods.update(fb_gauss=[*fb, f"method.init_from={ckpts['denoiser_ckpt']}"],
                           fb_mtdeq=[*fb, f"method.init_from={ckpts['mtdeq_ckpt']}"])
        if degrad:
            methods["degrad"] = ["method=degrad", f"trainer.max_steps={b['degrad_steps']}"]
        for name, ov in methods.items():
            if name == "pnp_mtdeq" and not tune_each_prior:  # the Gaussian prior's lam, unchanged
                gauss = next((r for r in rows if r["method"] == "pnp_gauss" and r["task"] == task), None)
                if gauss is None:
                    continue
                ov = [*ov, f"method.lam={gauss['lambda']}"]
            t0 = time.perf_counter()
            try:
                payload = run([*ov, *task_ov, *data, *extra], out / "eval" / task / name)
            except Exception as e:  # one failing row must not lose the others: it is reported and left out
                print(f"{name} on {task}: FAILED ({type(e).__name__}: {str(e)[:300]})", flush=True)
                continue
            test = payload["test"]
            wall = time.perf_counter() - t0
            rows.append({"method": name, "task": task, "psnr": test["model"]["psnr"], "ssim": test["model"]["ssim"],
                         "wall_s": wall, "solver": test.get("solver"), "lambda": test.get("method_lambda")})
            if name.startswith("pnp"):
                rows[-1].update(schedule=schedules[name][0], schedule_val_psnr=schedules[name][1])
            if name == "tv":  # the measurement row once per task (the same seeded test measurements for every row)
                rows.append({"method": "measurement", "task": task, **test["measurement"]})
            print(f"{task:<10} {name:<10} {test['model']['psnr']:6.2f} dB  ({wall:.0f} s)", flush=True)
        gauss, mt = (next((r for r in rows if r["method"] == m and r["task"] == task), None)
                     for m in ("pnp_gauss", "pnp_mtdeq"))
        if gauss and mt:
            rows.append({"method": "mtdeq_minus_gauss", "task": task, "psnr": mt["psnr"] - gauss["psnr"],
                         "ssim": mt["ssim"] - gauss["ssim"]})
    return rows


def table(rows: list[dict], key: str = "psnr") -> str:
    tasks = list(TASKS)
    lines = [f"{key.upper():<20}" + "".join(f"{t:>10}" for t in tasks)]
    for m in ROWS:
        vals = {r["task"]: r[key] for r in rows if r["method"] == m}
        if not vals:
            continue
        signed = m == "mtdeq_minus_gauss"
        cell = lambda v: f"{v:>+10.2f}" if signed else f"{v:>10.2f}"  # noqa: E731
        lines.append(f"{m:<20}" + "".join(cell(vals[t]) if t in vals else f"{'-':>10}" for t in tasks))
    lines.append(f"{'Willingham [4] gain':<20}" + "".join(f"{PAPER_GAIN[t]:>+10.2f}" for t in tasks))
    return "\n".join(lines)


def plot(payload: dict, path) -> bool:
    plt = pyplot(path)
    if plt is None:
        return False
    rows, tasks = payload["rows"], list(TASKS)
    methods = [m for m in ROWS if m != "mtdeq_minus_gauss" and any(r["method"] == m for r in rows)]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 6), gridspec_kw={"height_ratios": [3, 1.4]}, sharex=True)
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        vals = {r["task"]: r["psnr"] for r in rows if r["method"] == m}
        xs = [k + (i - (len(methods) - 1) / 2) * width for k, t in enumerate(tasks) if t in vals]
        ax.bar(xs, [vals[t] for t in tasks if t in vals], width, label=m)
    ax.set_ylabel("PSNR [dB]")
    ax.set_title("Tables I-II tasks of Willingham et al. [4] on the embedded test crops")
    ax.legend(fontsize=8, ncol=len(methods))
    gain = {r["task"]: r["psnr"] for r in rows if r["method"] == "mtdeq_minus_gauss"}
    ax2.bar([k - 0.2 for k, t in enumerate(tasks) if t in gain], [gain[t] for t in tasks if t in gain], 0.4,
            label="ours: MTDEQ - Gauss")
    ax2.bar([k + 0.2 for k in range(len(tasks))], [PAPER_GAIN[t] for t in tasks], 0.4, label="Willingham et al. [4]")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_ylabel("gain [dB]")
    ax2.set_xticks(range(len(tasks)), tasks)
    ax2.legend(fontsize=8)
    save_figure(fig, path)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, every value checked (argparse exits with status 2 and one line naming the argument)."""
    p = argparse.ArgumentParser(prog="python -m jfb_ip.bench.multitask", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CPU smoke budget (under 20 min on 2 cores); no DE-GRAD")
    p.add_argument("--denoiser-ckpt", type=existing_file, default=None, help="a method=denoiser checkpoint instead of training one")
    p.add_argument("--mtdeq-ckpt", type=existing_file, default=None, help="a method=mtdeq checkpoint instead of training one")
    p.add_argument("--mtdeq-steps", type=int_at_least(1), default=None,
                   help="MTDEQ's fine-tuning steps (default: the budget's, 600; --quick: 160)")
    p.add_argument("--mtdeq-lr", type=float_at_least(1e-12), default=None,
                   help="MTDEQ's fine-tuning learning rate (default: the budget's, 1e-5)")
    p.add_argument("--no-degrad", action="store_true", help="leave out the DE-GRAD rows (one training per task)")
    p.add_argument("--tune-each-prior", action="store_true",
                   help="choose each PnP prior's schedule and lam on the validation crops (default: the Gaussian "
                        "prior's for both, as [4] compares them)")
    p.add_argument("--out", type=output_dir, default=str(Path("outputs") / "bench_multitask"),
                   help="each run writes its trainings, evaluations and results to a new <out>/runs/<timestamp>/")
    p.add_argument("--json", type=output_file, default=None, help="default: <out>/runs/<timestamp>/multitask.json")
    p.add_argument("--png", type=output_file, default=None, help="default: <out>/runs/<timestamp>/multitask.png")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. data=folder data.root=<dir>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    b = QUICK if args.quick else FULL
    if args.mtdeq_steps is not None:
        b = {**b, "mtdeq_steps": args.mtdeq_steps}
    if args.mtdeq_lr is not None:
        b = {**b, "mtdeq_lr": args.mtdeq_lr}
    # a new directory per run: a failed run's checkpoints (on_exception.ckpt) are never resumed or refused by the next
    out = fresh_run_dir(args.out)
    print(f"outputs: {out}", flush=True)
    t0 = time.perf_counter()
    ckpts = train_priors(b, out, args.overrides, args.denoiser_ckpt, args.mtdeq_ckpt)
    rows = evaluate_rows(b, out, args.overrides, ckpts, degrad=not (args.quick or args.no_degrad),
                         tune_each_prior=args.tune_each_prior)
    wall = time.perf_counter() - t0
    print("\n" + table(rows) + "\n")
    gains = [r["psnr"] for r in rows if r["method"] == "mtdeq_minus_gauss"]
    if gains:
        print(f"MTDEQ - Gauss: mean {sum(gains) / len(gains):+.2f} dB, {sum(g > 0 for g in gains)}/{len(gains)} tasks "
              f"ahead (Willingham et al. [4]: +0.28 .. +1.00 dB, every task)")
    print(f"wall time {wall:.0f} s")
    payload = {"rows": rows, "budget": b, "quick": args.quick, "tune_each_prior": args.tune_each_prior,
               "wall_time_s": wall, "overrides": args.overrides,
               "run_dir": str(out), **{k: v for k, v in ckpts.items()}}
    write_outputs(payload, args.json or str(out / "multitask.json"), args.png or str(out / "multitask.png"), plot)
    return payload


if __name__ == "__main__":
    main()
