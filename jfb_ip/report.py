"""``python -m jfb_ip.report <sweep dir or run dirs> [--out DIR]``: finished training runs -> a markdown table and
PNG plots.

Every directory holding a ``metrics.json`` and a ``.hydra/`` folder (at or below the given paths) is one run. Runs that
differ only by ``seed`` form one row (mean +- standard deviation over the seeds); the row's *setting* lists the
overrides that vary across the runs besides method, task, backward and seed (an lr sweep shows its lr). Columns: test
PSNR/SSIM of the model (and the measurement's and the Wiener reference's PSNR), the test solves' converged fraction
and mean iterations, the local Lipschitz constants of N and T at the last validation (DE-GRAD), median training step
time, peak memory, mean forward and backward solver iterations per training step, and the run's wall time, all read
from ``metrics.json`` (``train.py`` writes them); a column no run has a value for is left out. A failed job (``"error"`` in its ``metrics.json``) is listed under the table with its error.

Writes ``report.md`` (the table, the command that made it), ``report.json`` (the rows), ``psnr_by_method.png`` and
``cost_vs_accuracy.png`` (test PSNR against step time and against peak memory: the price of each backward mode) into
``--out`` (default: ``<first path>/report``) and prints the table. Every table comes under a line naming the command
and the commit (``git rev-parse --short HEAD``) that made it. ``--markdown`` prints only that; ``--write FILE
--section NAME`` puts it between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in FILE, replacing what was
there (how the tables of README.md and docs/ are regenerated); with either, the files above are written only where
``--out`` is given.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# the groups whose choice is a column of its own; the rest of a run's varying overrides make its "setting"
KEY_GROUPS = ("method", "task", "backward")
MEMORY_MEASURE = {"memory/cuda_peak_bytes": "CUDA peak", "memory/rss_bytes": "peak RSS (CPU)",
                  "memory/max_rss_bytes": "peak RSS (CPU)"}


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories at or below ``paths``: those with a ``metrics.json`` and Hydra's ``.hydra/`` beside it."""
    found: set[Path] = set()
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist (give a sweep directory such as outputs/train/multiruns/"
                                    f"<time> or run directories)")
        candidates = [p / "metrics.json"] + sorted(p.rglob("metrics.json"))
        found.update(m.parent for m in candidates if m.is_file() and (m.parent / ".hydra").is_dir())
    return sorted(found)


def _overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def read_metrics(run: Path) -> dict[str, Any] | None:
    """A run's metrics.json, or None after one warning line on stderr naming the run when it is not a JSON object
    (a job killed while writing it, or another file under that name): the report goes on without that run."""
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"not valid JSON: {e.msg}" if isinstance(e, json.JSONDecodeError) else f"unreadable: {e}"
        print(f"warning: skipped the run {run}: its metrics.json is {why}", file=sys.stderr)
        return None
    if not isinstance(metrics, dict):
        print(f"warning: skipped the run {run}: its metrics.json holds a {type(metrics).__name__}, not an object",
              file=sys.stderr)
        return None
    return metrics


def load_run(run: Path) -> dict[str, Any] | None:
    """One run's metrics.json with the Hydra choices and overrides that made it; None if that file is unreadable
    (see :func:`read_metrics`)."""
    metrics = read_metrics(run)
    if metrics is None:
        return None
    hydra_yaml = run / ".hydra" / "hydra.yaml"
    choices = dict(OmegaConf.load(hydra_yaml).hydra.runtime.choices) if hydra_yaml.is_file() else {}
    config = metrics.get("config") or {}
    seed = config.get("seed")
    if seed is None:  # a failed job's metrics.json holds no config: read the composed one
        cfg_yaml = run / ".hydra" / "config.yaml"
        seed = OmegaConf.load(cfg_yaml).get("seed") if cfg_yaml.is_file() else None
    return {"dir": run, "metrics": metrics, "choices": {g: choices.get(g) for g in KEY_GROUPS}, "seed": seed,
            "overrides": _overrides(run)}


# overrides that say where or how a run was recorded, not what was run: never part of a row's setting
NOT_SETTINGS = ("paths.", "hydra.", "logger", "trainer.enable_progress_bar")


def _setting_keys(runs: list[dict[str, Any]]) -> set[str]:
    """Override keys whose value is not the same in every run (besides the key groups, seed and NOT_SETTINGS)."""
    per_run = [dict(o.lstrip("+~").partition("=")[::2] for o in r["overrides"]) for r in runs]
    keys = {k for k in set().union(*per_run) - set(KEY_GROUPS) - {"seed"} if not k.startswith(NOT_SETTINGS)}
    return {k for k in keys if len({p.get(k) for p in per_run}) > 1}


def _get(d: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return float(d) if isinstance(d, (int, float)) and math.isfinite(d) else None


def _stat(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


# report column -> where each run's value is in metrics.json
FIELDS = {
    "psnr": ("test", "model", "psnr"), "ssim": ("test", "model", "ssim"),
    "wiener_psnr": ("test", "wiener", "psnr"), "measurement_psnr": ("test", "measurement", "psnr"),
    "tv_psnr": ("test", "tv", "psnr"),
    "step_time_s": ("train", "step_time_s_median"), "peak_memory_bytes": ("train", "peak_memory_bytes"),
    "fwd_iters": ("train", "fwd_iters_mean"), "bwd_iters": ("train", "bwd_iters_mean"),
    "test_fwd_iters": ("test", "solver", "fwd_iters_mean"),
    "converged_fraction": ("test", "solver", "converged_fraction"),
    "lipschitz_net": ("val", "val/solver/lipschitz_net_mean"), "lipschitz_T": ("val", "val/solver/lipschitz_T_mean"),
    "steps": ("train", "steps"), "wall_time_s": ("wall_time_s",),
}


def build_rows(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one row per method/task/backward/setting with each field's mean and std over seeds, the failed runs)."""
    ok = [r for r in runs if "error" not in r["metrics"]]
    failed = [r for r in runs if "error" in r["metrics"]]
    keys = _setting_keys(runs)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in ok:
        setting = ",".join(sorted(o.lstrip("+~") for o in r["overrides"] if o.lstrip("+~").partition("=")[0] in keys))
        r["setting"] = setting
        groups.setdefault(tuple(r["choices"][g] for g in KEY_GROUPS) + (setting,), []).append(r)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(KEY_GROUPS + ("setting",), key))
        row["seeds"] = sorted((m["seed"] for m in members), key=str)
        row["runs"] = [str(m["dir"]) for m in members]
        for name, path in FIELDS.items():
            row[name], row[name + "_std"] = _stat([_get(m["metrics"], *path) for m in members])
        measures = {(m["metrics"].get("train") or {}).get("memory_measure") for m in members} - {None}
        row["memory_measure"] = ", ".join(sorted(MEMORY_MEASURE.get(x, x) for x in measures)) or None
        rows.append(row)
    rows.sort(key=lambda r: tuple(str(r[k]) for k in ("task", "method", "backward", "setting")))
    return rows, [{"dir": str(r["dir"]), **r["choices"], "seed": r["seed"], "error": r["metrics"]["error"]}
                  for r in failed]


def _fmt(row: dict[str, Any], name: str, spec: str, scale: float = 1.0) -> str:
    v, s = row.get(name), row.get(name + "_std")
    if v is None:
        return "-"
    text = format(v * scale, spec)
    return text if s is None else f"{text} ± {format(s * scale, spec)}"


COLUMNS = [("method", None), ("task", None), ("backward", None), ("setting", None), ("seeds", None),
           ("PSNR [dB]", ("psnr", ".2f")), ("SSIM", ("ssim", ".4f")), ("measurement PSNR", ("measurement_psnr", ".2f")),
           ("Wiener PSNR", ("wiener_psnr", ".2f")), ("TV PSNR", ("tv_psnr", ".2f")), ("converged", ("converged_fraction", ".2f")),
           ("test fwd iters", ("test_fwd_iters", ".1f")), ("Lip(N)", ("lipschitz_net", ".3f")),
           ("Lip(T)", ("lipschitz_T", ".3f")),
           ("step time [s]", ("step_time_s", ".3f")), ("peak memory [MiB]", ("peak_memory_bytes", ".0f")),
           ("fwd iters", ("fwd_iters", ".1f")), ("bwd iters", ("bwd_iters", ".1f")),
           ("steps", ("steps", ".0f")), ("wall time [s]", ("wall_time_s", ".1f"))]
# shown only when some run has a value (a sweep of methods without a fixed point or a Lipschitz log stays narrow)
OPTIONAL = {"TV PSNR", "converged", "test fwd iters", "Lip(N)", "Lip(T)", "bwd iters"}


def markdown(rows: list[dict[str, Any]], failed: list[dict[str, Any]]) -> str:
    columns = [(c, spec) for c, spec in COLUMNS
               if c not in OPTIONAL or any(r.get(spec[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(c for c, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for col, spec in columns:
            if spec is None:
                v = r[col]
                cells.append(",".join(map(str, v)) if isinstance(v, list) else (str(v) if v not in (None, "") else "-"))
            else:
                name, fmt = spec
                cells.append(_fmt(r, name, fmt, 2.0 ** -20 if name == "peak_memory_bytes" else 1.0))
        lines.append("| " + " | ".join(cells) + " |")
    measures = sorted({r["memory_measure"] for r in rows if r.get("memory_measure")})
    notes = ["", "PSNR/SSIM: the model on the seeded test split (mean ± std over seeds where there are several); step "
             "time: median over training steps; fwd/bwd iters: mean solver iterations per training step (bwd: "
             "implicit/neumann modes only); test fwd iters / converged: the test split's mean forward iterations and the "
             "fraction of its solves that reached the tolerance; Lip(N) / Lip(T): local Lipschitz constants of the "
             "network and of the iteration map at the last validation's fixed points (mean over the batch); peak "
             "memory: " + (", ".join(measures) or "not recorded") + "."]
    if failed:
        notes += ["", "Failed runs:", ""] + [f"- `{Path(f['dir']).name}` ({f['method']}, {f['task']}, {f['backward']}, "
                                             f"seed {f['seed']}): {f['error']}" for f in failed]
    return "\n".join(lines + notes)


def _label(r: dict[str, Any]) -> str:
    return "\n".join(x for x in (f"{r['method']}/{r['backward']}", r["setting"].replace(",", "\n")) if x)


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """psnr_by_method.png (test PSNR per row, seed spread as error bars, the Wiener reference as a marker) and
    cost_vs_accuracy.png (PSNR against median step time and against peak memory, one marker per backward mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["psnr"] is not None]
    paths = []
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1), 3.8))
    xs = range(len(rows))
    ax.bar(xs, [r["psnr"] for r in rows], yerr=[r["psnr_std"] or 0 for r in rows], capsize=3, color="tab:blue",
           label="model")
    wiener = [(i, r["wiener_psnr"]) for i, r in enumerate(rows) if r["wiener_psnr"] is not None]
    if wiener:
        ax.scatter(*zip(*wiener), marker="_", s=400, color="k", zorder=3, label="Wiener")
    low = min([r["psnr"] for r in rows] + [w for _, w in wiener]) if rows else 0
    ax.set_ylim(bottom=max(0.0, low - 3))
    ax.set_xticks(list(xs), [_label(r) + (f"\n{r['task']}" if len({x['task'] for x in rows}) > 1 else "")
                             for r in rows], fontsize=7)
    ax.set_ylabel("test PSNR [dB]")
    ax.set_title("PSNR by method")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "psnr_by_method.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    modes = sorted({str(r["backward"]) for r in rows})
    markers = dict(zip(modes, "osD^v<>pP*X"))
    for ax, (field, xlabel, scale) in zip(axes, [("step_time_s", "median step time [s]", 1.0),
                                                 ("peak_memory_bytes", "peak memory [MiB]", 2.0 ** -20)]):
        for r in rows:
            if r[field] is None:
                continue
            ax.errorbar(r[field] * scale, r["psnr"], yerr=r["psnr_std"] or 0, fmt=markers[str(r["backward"])],
                        color=f"C{modes.index(str(r['backward'])) % 10}", capsize=2)
            ax.annotate(_label(r).replace("\n", " "), (r[field] * scale, r["psnr"]), fontsize=6,
                        textcoords="offset points", xytext=(4, 3))
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("test PSNR [dB]")
    handles = [plt.Line2D([], [], ls="", marker=markers[m], color=f"C{i % 10}", label=m) for i, m in enumerate(modes)]
    axes[1].legend(handles=handles, title="backward", fontsize=7)
    fig.suptitle("cost versus accuracy")
    fig.tight_layout()
    paths.append(out / "cost_vs_accuracy.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def git_commit(where: Path | None = None) -> str:
    """``git rev-parse --short HEAD`` of the checkout at ``where`` (default: this package's), ``unknown`` outside one."""
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where or Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "unknown"


def write_section(file: Path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in ``file`` by ``text``.

    Regenerating a table then replaces it instead of adding one beside the old; a file without exactly one such
    pair is an error, so a mistyped name never appends a second table."""
    begin, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    doc = file.read_text()
    i, j = doc.find(begin), doc.find(end)
    if doc.count(begin) != 1 or doc.count(end) != 1 or j < i:
        raise ValueError(f"{file} needs exactly one '{begin}' line followed by one '{end}' line (add the pair where "
                         f"the table goes)")
    file.write_text(doc[:i + len(begin)] + "\n" + text.strip("\n") + "\n" + doc[j:])


def report(paths: list[Path], out: Path | None = None, command: str | None = None,
           files: bool = True) -> dict[str, Any]:
    """Read the runs under ``paths``; unless ``files`` is false, write report.md / report.json / the PNGs into
    ``out``. Returns the rows, the failed runs and ``block``: the table under a line naming the command and commit."""
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise FileNotFoundError(f"no finished runs (metrics.json beside .hydra/) under {', '.join(map(str, paths))}")
    runs = [r for r in map(load_run, run_dirs) if r is not None]
    if not runs:
        raise ValueError(f"none of the {len(run_dirs)} run(s) under {', '.join(map(str, paths))} has a readable "
                         f"metrics.json")
    rows, failed = build_rows(runs)
    table = markdown(rows, failed)
    command = command or "python -m jfb_ip.report " + " ".join(map(str, paths))
    skipped = len(run_dirs) - len(runs)
    block = (f"Made by `{command}` at commit {git_commit()} from {len(runs)} run(s)"
             + (f" ({skipped} with an unreadable metrics.json left out)" if skipped else "") + f".\n\n{table}\n")
    res = {"rows": rows, "failed": failed, "markdown": table, "block": block, "files": [],
           "skipped": sorted(set(run_dirs) - {r["dir"] for r in runs})}
    if files:
        out = out or (paths[0] / "report")
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(block)
        (out / "report.json").write_text(json.dumps({"rows": rows, "failed": failed}, indent=2, default=str))
        pngs = plot(rows, out) if any(r["psnr"] is not None for r in rows) else []
        res["files"] = [out / "report.md", out / "report.json", *pngs]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jfb_ip.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="a sweep directory (outputs/train/multiruns/<time>) or run dirs")
    ap.add_argument("--out", type=Path, default=None, help="where to write report.md and the PNGs "
                                                           "(default: <first path>/report)")
    ap.add_argument("--markdown", action="store_true", help="print only the table, under a line naming this command "
                                                            "and the commit (files only with --out)")
    ap.add_argument("--write", type=Path, metavar="FILE", help="replace the block between <!-- report:NAME --> and "
                                                               "<!-- /report:NAME --> in FILE by that table "
                                                               "(files only with --out)")
    ap.add_argument("--section", metavar="NAME", help="the block's NAME (with --write)")
    args = ap.parse_args(argv)
    if (args.write is None) != (args.section is None):
        ap.error("--write FILE and --section NAME go together")
    command = "python -m jfb_ip.report " + " ".join(sys.argv[1:] if argv is None else argv)
    quiet = args.markdown or args.write is not None
    try:
        res = report(args.paths, args.out, command, files=not quiet or args.out is not None)
        if args.write is not None:
            write_section(args.write, args.section, res["block"])
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    if args.markdown:
        print(res["block"], end="")
        return 0
    print(res["markdown"])
    if res["files"]:
        print("\nwrote " + ", ".join(str(p) for p in res["files"]))
    if args.write is not None:
        print(f"\nwrote section {args.section!r} of {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
