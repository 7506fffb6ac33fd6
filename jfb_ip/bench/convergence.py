"""Are the equilibria reached? Per-method convergence table, Lipschitz constants and residual curves.

    python -m jfb_ip.bench.convergence [--methods degrad deprox luser_sw luser_dw] [--ckpt <ckpt> ...]
        [--images 8] [--image-size 48] [--json <file>] [--png <file>] [override ...]

Each method is built from its Hydra config exactly as ``train.py`` builds it (at initialisation, seed 0),
or from a checkpoint (``--ckpt``, any number, with the run config stored inside), and solves the
fixed points of the first ``--images`` seeded test measurements of the embedded data. Printed per
method (and per stage for LUSER): the fraction of solves that reached ``solver.tol`` (a solve stopped
by ``max_iter`` never counts), mean/max forward iterations and final relative residual, and, for
methods with one network inside one map (DE-GRAD, DE-Prox), the local Lipschitz constants of the
network and of T at the fixed points (power iteration on J^T J by Jacobian-vector products,
:func:`jfb_ip.solvers.lipschitz.local_lipschitz`). The PNG shows the batch's largest relative residual
after each iteration, per method (LUSER: one line per stage), against the tolerance: the plot a DEQ user
checks first. Overrides (``solver.max_iter=100``, ``task=deblur_5x5``) apply to every method.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..checkpoint import load_checkpoint, load_weights
from ..lit.run import build_module
from .. import config_dir
from .common import (compose_train, existing_file, int_at_least, module_groups, output_file, pyplot, save_figure,
                     seeded_split_batch, write_outputs)

FIXED_POINT_METHODS = ("degrad", "deprox", "luser_sw", "luser_dw")
COLUMNS = ("converged_fraction", "fwd_iters_mean", "fwd_iters_max", "fwd_residual_mean", "fwd_residual_max",
           "lipschitz_net_max", "lipschitz_T_max", "equilibrium_error_max", "equilibrium_unbounded_fraction")


def _build(name: str, overrides: list[str], image_size: int):
    """(label, module, data config) from a method name or a checkpoint path."""
    if Path(name).suffix == ".ckpt":
        ckpt = load_checkpoint(name)
        run_config = ckpt["hyper_parameters"]["run_config"]
        cfg = OmegaConf.create(run_config)
        module = build_module(OmegaConf.create({k: cfg.get(k) for k in ("method", "task", "module")}), run_config)
        load_weights(module, ckpt, name)
        return Path(name).parent.parent.name + "/" + Path(name).stem, module, cfg.data
    torch.manual_seed(0)
    sub = module_groups(compose_train([f"method={name}", "logger=none", f"data.image_size={image_size}", *overrides]))
    return name, build_module(sub, OmegaConf.to_container(sub)), sub.data


def _row(summary: dict, lipschitz: dict) -> dict:
    return {k: summary.get(k, lipschitz.get(k, float("nan"))) for k in COLUMNS}


def measure(names: list[str], overrides: list[str], images: int, image_size: int) -> dict:
    results = {}
    for name in names:
        label, module, data_cfg = _build(name, overrides, image_size)
        method = module.method
        if getattr(method, "solve", None) is None:
            print(f"{label}: no fixed point to check (skipped)")
            continue
        method.eval()
        x, meas = seeded_split_batch(data_cfg, module, "test", images)
        with torch.no_grad():
            rec = method(meas)
        stats = rec.solver_stats()
        lip = {}
        if hasattr(method, "lipschitz_estimates"):
            was, method.log_lipschitz = getattr(method, "log_lipschitz", False), True
            lip = method.lipschitz_estimates(meas)
            method.log_lipschitz = was
        entry = {"row": _row(stats.summary(""), lip), "tol": method.solve.tol, "max_iter": method.solve.max_iter,
                 "trace": stats.trace, "stages": []}
        for part in stats.parts or []:
            entry["stages"].append({"row": _row(part.summary(""), {}), "trace": part.trace})
        results[label] = entry
    return results


def table(results: dict) -> str:
    labels = {label: f"{label} (tol {e['tol']:g}, cap {e['max_iter']})" for label, e in results.items()}
    w = max([26, *(len(v) + 1 for v in labels.values())])
    head = f"{'method':<{w}}{'converged':>10}{'iters mean/max':>16}{'residual mean/max':>20}{'Lip(net)':>10}{'Lip(T)':>8}{'error bound':>13}"
    lines = [head]
    fmt = lambda v, spec: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)  # noqa: E731

    def line(label, r):
        return (f"{label:<{w}}{fmt(r['converged_fraction'], '.2f'):>10}"
                f"{fmt(r['fwd_iters_mean'], '.1f') + '/' + fmt(r['fwd_iters_max'], '.0f'):>16}"
                f"{fmt(r['fwd_residual_mean'], '.1e') + '/' + fmt(r['fwd_residual_max'], '.1e'):>20}"
                f"{fmt(r['lipschitz_net_max'], '.3f'):>10}{fmt(r['lipschitz_T_max'], '.3f'):>8}"
                f"{bound(r):>13}")

    def bound(r):  # the largest error bound over the batch: none as soon as one sample's T does not contract
        unbounded = r["equilibrium_unbounded_fraction"]
        if isinstance(unbounded, float) and unbounded > 0:
            return f"none ({unbounded:.0%})"
        return fmt(r["equilibrium_error_max"], ".1e")

    for label, e in results.items():
        lines.append(line(labels[label], e["row"]))
        for k, s in enumerate(e["stages"]):
            lines.append(line(f"  stage {k + 1}", s["row"]))
    return "\n".join(lines)


def plot(payload: dict, path) -> bool:
    plt = pyplot(path)
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, e) in enumerate(payload["results"].items()):
        color = f"C{i}"
        curves = [s["trace"] for s in e["stages"]] or [e["trace"]]
        for k, tr in enumerate(curves):
            ax.semilogy(range(1, len(tr) + 1), tr, color=color, lw=1.5 if len(curves) == 1 else 0.8,
                        label=label if k == 0 else None)
        ax.axhline(e["tol"], color=color, ls=":", lw=0.8)
    ax.set_xlabel("forward iteration")
    ax.set_ylabel("max relative residual over the batch")
    ax.set_title("fixed-point convergence (dotted: tolerance)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, every value checked (argparse exits with status 2 and one line naming the argument).
    Hydra overrides (``key=value``) may follow ``--methods`` or ``--ckpt`` directly."""
    valid = sorted(f.stem for f in (config_dir() / "method").glob("*.yaml"))
    p = argparse.ArgumentParser(prog="python -m jfb_ip.bench.convergence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=None, metavar="METHOD",
                   help=f"method configs (default: {' '.join(FIXED_POINT_METHODS)}; one without a fixed point is "
                        f"skipped)")
    p.add_argument("--ckpt", nargs="*", default=[], help="checkpoints to check (their own config and data)")
    p.add_argument("--images", type=int_at_least(1), default=8)
    p.add_argument("--image-size", type=int_at_least(8), default=48)
    p.add_argument("--json", type=output_file, default=None)
    p.add_argument("--png", type=output_file, default="outputs/bench/convergence.png", help="'' to skip the plot")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every method config")
    a = p.parse_args(argv)
    # nargs="*" options take the overrides after them too
    taken = [v for v in (a.methods or []) + a.ckpt if "=" in v]
    a.overrides = taken + a.overrides
    a.ckpt = [v for v in a.ckpt if "=" not in v]
    if a.methods is not None:
        a.methods = [v for v in a.methods if "=" not in v]
        unknown = [m for m in a.methods if m not in valid]
        if unknown:
            p.error(f"argument --methods: invalid choice(s) {unknown} (choose from {', '.join(valid)})")
    for path in a.ckpt:
        try:
            existing_file(path)
        except argparse.ArgumentTypeError as e:
            p.error(f"argument --ckpt: {e}")
    return a


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    methods = args.methods if args.methods is not None else ([] if args.ckpt else list(FIXED_POINT_METHODS))
    results = measure(methods + list(args.ckpt), args.overrides, args.images, args.image_size)
    print(table(results))
    payload = {"results": results, "images": args.images, "overrides": args.overrides}
    write_outputs(payload, args.json, args.png, plot)
    return payload


if __name__ == "__main__":
    main()
