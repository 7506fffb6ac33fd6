"""Quality comparison of the solver families under one training budget.

    python -m jfb_ip.bench.compare [--steps 300] [--image-size 32] [--out outputs/compare]

Trains each method of Guan et al.'s [3] comparison (LU-DnCNN, LUSER-SW, LUSER-DW) and DE-GRAD
with JFB and with implicit differentiation (Liu et al. [1]) through ``train.py`` — same data,
task, seed, batch size and number of optimizer steps — then prints their held-out
PSNR/SSIM beside the measurement and the Wiener filter. Each run keeps its own directory
(metrics.json, checkpoints) under ``--out``; the table is also written to ``compare.json``.
By default the unrolled methods run at a CPU scale (see ``CPU_SCALE``); ``--paper-sizes``
uses the configs' architectures of Guan et al. [3].
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import int_at_least, output_dir


# The CPU scale (default): K = 4 stages, LU-DnCNN's DnCNN at 8 layers of 32 channels (the
# DE-GRAD default). LUSER's inner solves run at the default tolerance (1e-3, 50 iterations): with the
# contractive default block (norm_mode=operator) they converge in about 5 Anderson iterations per stage
# after training; the table's "converged" column says how many test solves reached the tolerance.
# --paper-sizes drops these (Guan et al. [3]: K = 8, 17x64 DnCNN; meant for a GPU).
LUSER_CPU = ["method.stages=4"]
CPU_SCALE = {
    "lu_dncnn": ["method.stages=4", "method.net.depth=8", "method.net.width=32"],
    "luser_sw": LUSER_CPU,
    "luser_dw": LUSER_CPU,
    "luser_dw_implicit": LUSER_CPU,
}

# name -> overrides; the rest of the budget is shared (see main)
RUNS = {
    "lu_dncnn": ["method=lu_dncnn"],
    "luser_sw": ["method=luser_sw"],
    "luser_dw": ["method=luser_dw"],
    "luser_dw_implicit": ["method=luser_dw", "backward=implicit"],  # LUSER trained by implicit differentiation
    "degrad_jfb": ["method=degrad", "backward=jfb"],
    "degrad_implicit": ["method=degrad", "backward=implicit"],
    "deprox_jfb": ["method=deprox", "backward=jfb"],
}


def run(names: list[str], steps: int, image_size: int, batch: int, out: Path, extra: list[str],
        paper_sizes: bool = False) -> dict:
    results = {}
    for name in names:
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a run directory with last.ckpt would be resumed
        scale = [] if paper_sizes else CPU_SCALE.get(name, [])
        # one loss and exact training solves for every method (conf/method_task/degrad_deblur.yaml would give DE-GRAD
        # on deblurring the L1 loss and solver.train_tol=1e-2 alone); LU-DnCNN has no solver to set
        same = ["module.loss._target_=torch.nn.MSELoss"] + ([] if name == "lu_dncnn" else ["solver.train_tol=null"])
        cmd = [sys.executable, "-m", "jfb_ip.train", *RUNS[name], *scale, *same, f"trainer.max_steps={steps}", f"data.image_size={image_size}",
               f"data.batch_size={batch}", f"data.eval_batch_size={batch}", "logger=csv",
               "trainer.enable_progress_bar=false", "trainer.check_val_every_n_epoch=1000", *extra,  # validated once at the end
               f"hydra.run.dir={run_dir}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"{name}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        results[name] = {"test": {k: metrics["test"][k] for k in ("measurement", "wiener", "model")},
                         "solver": metrics["test"].get("solver"),
                         "wall_time_s": wall, "n_images": metrics["test"]["n_images"], "overrides": cmd[3:]}
        print(f"{name}: model {metrics['test']['model']['psnr']:.2f} dB in {wall:.0f} s", flush=True)
    return results


def table(results: dict) -> str:
    if not results:
        return "no run finished"
    first = next(iter(results.values()))
    lines = [f"{'method':<18}{'PSNR [dB]':>10}{'SSIM':>8}{'converged':>10}{'train+test [s]':>16}"]
    for row in ("measurement", "wiener"):
        lines.append(f"{row:<18}{first['test'][row]['psnr']:>10.2f}{first['test'][row]['ssim']:>8.4f}{'':>10}{'':>16}")
    for name, r in results.items():
        m = r["test"]["model"]
        conv = (r.get("solver") or {}).get("converged_fraction")  # test solves that reached tol; '-': no fixed point
        conv = "-" if conv is None else f"{conv:.2f}"
        lines.append(f"{name:<18}{m['psnr']:>10.2f}{m['ssim']:>8.4f}{conv:>10}{r['wall_time_s']:>16.0f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, every value checked (argparse exits with status 2 and one line naming the argument)."""
    p = argparse.ArgumentParser(prog="python -m jfb_ip.bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    p.add_argument("--steps", type=int_at_least(1), default=300, help="optimizer steps per method (the shared budget)")
    p.add_argument("--image-size", type=int_at_least(8), default=32)
    p.add_argument("--batch", type=int_at_least(1), default=8)
    p.add_argument("--out", type=output_dir, default=str(Path("outputs") / "compare"))
    p.add_argument("--paper-sizes", action="store_true", help="Guan et al. [3] architectures (K=8, 17x64), for a GPU")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. task=deblur_5x5)")
    args = p.parse_args(argv)
    names = [n for n in args.methods.split(",") if n]
    unknown = set(names) - set(RUNS)
    if unknown:
        p.error(f"argument --methods: unknown methods {sorted(unknown)}; choose from {list(RUNS)}")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    names = args.names
    results = run(names, args.steps, args.image_size, args.batch, args.out, args.overrides, args.paper_sizes)
    print("\n" + table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps({"steps": args.steps, "image_size": args.image_size,
                                                       "batch": args.batch, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
