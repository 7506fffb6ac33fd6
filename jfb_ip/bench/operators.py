"""The Radon transform's two implementations side by side: sparse matrix products against the ``grid_sample`` kernels.

    python -m jfb_ip.bench.operators [--sizes 48 128] [--batch 32] [--repeats 20] [--device cpu] [--json <file>]

For each image side, builds ``physics.CT.parallel_beam(side)`` twice, with its sparse matrices (the default where they
fit) and with ``matrix_nnz=0`` (the ``grid_sample`` interpolation and, for A^T, its backward scatter), and times A and
A^T on the same random batch in this one run, alternating the two so that a load change hits both. Prints the
milliseconds, the ratio kernels / sparse, the one-off build time of the matrices and the largest difference of the
two results relative to their scale (the two must agree to rounding). Run it with ``OMP_NUM_THREADS=1`` on a shared
machine.
"""
from __future__ import annotations

import argparse
import time

import torch

from ..physics.ct import CT
from .common import device, finish_rows, int_at_least, output_file


def _best_ms(f, repeats: int) -> float:
    f()  # warm-up (and the matrices' build for the sparse operator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def _sync(dev: str):
    return torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)


def measure(side: int, batch: int, repeats: int, dev: str = "cpu") -> dict:
    """One row: the times of A and A^T for both implementations and their agreement."""
    sparse, kernels = CT.parallel_beam(side), CT.parallel_beam(side, matrix_nnz=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, side, side, generator=gen).to(dev)
    t0 = time.perf_counter()
    built = sparse._matrices(x.dtype, x.device) is not None
    build_s = time.perf_counter() - t0
    y = kernels.A(x)
    sync = _sync(dev)
    row = {"side": side, "batch": batch, "angles": sparse.n_angles, "detector": sparse.detector_size,
           "sparse": built, "build_s": build_s}
    for name, fn in (("A", lambda op: op.A(x)), ("A_adjoint", lambda op: op.A_adjoint(y))):
        ref = fn(kernels)
        row[f"{name}_rel_diff"] = ((fn(sparse) - ref).abs().max() / ref.abs().max()).item()
        ms = {}
        for label, op in (("kernels", kernels), ("sparse", sparse)) * 2:  # alternated, best of both passes
            t = _best_ms(lambda: (fn(op), sync()), max(1, repeats // 2))
            ms[label] = min(ms.get(label, float("inf")), t)
        row[f"{name}_ms_kernels"], row[f"{name}_ms_sparse"] = ms["kernels"], ms["sparse"]
        row[f"{name}_ratio"] = ms["kernels"] / ms["sparse"]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| side | angles x bins | A: kernels / sparse [ms] | ratio | A^T: kernels / sparse [ms] | ratio | "
             "build [s] | max rel. diff |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['side']} | {r['angles']} x {r['detector']} | {r['A_ms_kernels']:.2f} / {r['A_ms_sparse']:.2f} "
                     f"| {r['A_ratio']:.1f}x | {r['A_adjoint_ms_kernels']:.2f} / {r['A_adjoint_ms_sparse']:.2f} | "
                     f"{r['A_adjoint_ratio']:.1f}x | {r['build_s']:.2f} | "
                     f"{max(r['A_rel_diff'], r['A_adjoint_rel_diff']):.1e} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jfb_ip.bench.operators", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int_at_least(4), nargs="+", default=[48, 128])
    p.add_argument("--batch", type=int_at_least(1), default=32)
    p.add_argument("--repeats", type=int_at_least(1), default=20)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--json", type=output_file, default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for side in args.sizes:
        rows.append(measure(side, args.batch, args.repeats, args.device))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    return finish_rows(rows, table, args.json)


if __name__ == "__main__":
    main()
