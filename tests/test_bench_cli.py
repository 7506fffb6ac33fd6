"""The benchmarks' command lines refuse bad values before any work: argparse's exit status 2 and one error line
naming the argument, never a traceback minutes later. Parsers only: nothing is measured here."""
from __future__ import annotations

import pytest
import torch

from jfb_ip.bench import backward, common, compare, convergence, memory, multitask, operators

# (bench module, argv with {tmp} for a scratch folder holding a regular file {tmp}/file, expected message)
BAD = [
    (backward, ["--sides", "0"], "argument --sides: must be an integer >= 1, got '0'"),
    (backward, ["--sides", "16", "abc"], "argument --sides: must be an integer >= 1, got 'abc'"),
    (backward, ["--batch", "-1"], "argument --batch: must be an integer >= 1, got '-1'"),
    (backward, ["--repeats", "0"], "argument --repeats: must be an integer >= 1, got '0'"),
    (backward, ["--warmup", "-1"], "argument --warmup: must be an integer >= 0"),
    (backward, ["--depth", "1"], "argument --depth: must be an integer >= 2"),
    (backward, ["--max-iter", "0"], "argument --max-iter: must be an integer >= 1"),
    (backward, ["--tol", "nan"], "argument --tol: must be a finite number >= 0, got 'nan'"),
    (backward, ["--tol=-1e-3"], "argument --tol: must be a finite number >= 0"),
    (backward, ["--threads", "0"], "argument --threads: must be an integer >= 1"),
    (backward, ["--seed", "-1"], "argument --seed: must be an integer >= 0"),
    (backward, ["--modes", "jfb", "magic"], "argument --modes: invalid choice: 'magic' (choose from 'jfb', 'implicit'"),
    (backward, ["--device", "cuda:7"], "argument --device: 'cuda:7': this machine has"),
    (backward, ["--device", "gpu"], "argument --device: 'gpu' is not a device: cpu, cuda, cuda:<index> or mps"),
    (backward, ["--json", "{tmp}/file/backward.json"], "argument --json: cannot write {tmp}/file/backward.json: "
                                                        "{tmp}/file is not a directory"),
    (backward, ["--png", "{tmp}"], "argument --png: {tmp} is a directory, not a file"),
    (memory, ["--iters", "0"], "argument --iters: must be an integer >= 1, got '0'"),
    (memory, ["--stages", "2", "0"], "argument --stages: must be an integer >= 1, got '0'"),
    (memory, ["--batches", "4", "2"], "argument --batches: the two batch sizes must increase (b1 < b2), got 4 2"),
    (memory, ["--batches", "0", "2"], "argument --batches: must be an integer >= 1, got '0'"),
    (memory, ["--image-size", "4"], "argument --image-size: must be an integer >= 8"),
    (memory, ["--channels", "2"], "argument --channels: invalid choice: 2 (choose from 1, 3)"),
    (memory, ["--tasks", "ct"], "argument --channels: 3 channels, but task(s) ['ct'] take [1]"),
    (memory, ["--methods", "degrad"], "argument --methods: invalid choice: 'degrad' (choose from 'lu_dncnn', "
                                      "'degrad_jfb'"),
    (memory, ["--device", "cuda:7"], "argument --device: 'cuda:7': this machine has"),
    (memory, ["--json", "{tmp}/file/x/memory.json"], "{tmp}/file is not a directory"),
    (convergence, ["--methods", "degrad", "magic"], "argument --methods: invalid choice(s) ['magic'] (choose from degrad,"),
    (convergence, ["--images", "0"], "argument --images: must be an integer >= 1, got '0'"),
    (convergence, ["--image-size", "-1"], "argument --image-size: must be an integer >= 8, got '-1'"),
    (convergence, ["--ckpt", "{tmp}/missing.ckpt"], "argument --ckpt: {tmp}/missing.ckpt does not exist"),
    (convergence, ["--ckpt", "{tmp}"], "argument --ckpt: {tmp} is a directory, not a file"),
    (convergence, ["--json", "{tmp}"], "argument --json: {tmp} is a directory, not a file"),
    (compare, ["--methods", "luser_dw,magic"], "argument --methods: unknown methods ['magic']; choose from ['lu_dncnn'"),
    (compare, ["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
    (compare, ["--batch", "-1"], "argument --batch: must be an integer >= 1, got '-1'"),
    (compare, ["--out", "{tmp}/file"], "argument --out: {tmp}/file exists and is not a directory"),
    (multitask, ["--out", "{tmp}/file/out"], "argument --out: cannot write {tmp}/file/out: {tmp}/file is not a directory"),
    (multitask, ["--denoiser-ckpt", "{tmp}/none.ckpt"], "argument --denoiser-ckpt: {tmp}/none.ckpt does not exist"),
    (multitask, ["--mtdeq-ckpt", "{tmp}"], "argument --mtdeq-ckpt: {tmp} is a directory, not a file"),
    (multitask, ["--png", "{tmp}/file/multitask.png"], "{tmp}/file is not a directory"),
    (multitask, ["--mtdeq-steps", "0"], "argument --mtdeq-steps: must be an integer >= 1, got '0'"),
    (multitask, ["--mtdeq-lr", "0"], "argument --mtdeq-lr: must be a finite number >= 1e-12, got '0'"),
    (operators, ["--sizes", "48", "2"], "argument --sizes: must be an integer >= 4, got '2'"),
    (operators, ["--json", "{tmp}"], "argument --json: {tmp} is a directory, not a file"),
]


@pytest.mark.parametrize("bench,argv,message", BAD,
                         ids=[f"{b.__name__.rsplit('.', 1)[1]}:{' '.join(a)}" for b, a, _ in BAD])
def test_bad_values_end_in_argparse_one_error_line(bench, argv, message, tmp_path, capsys):
    if "cuda:7" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message.replace("{tmp}", str(tmp_path)) in err.strip().splitlines()[-1], err


def test_good_values_parse_without_creating_anything(tmp_path):
    a = backward.parse_args(["--sides", "16", "32", "--batch", "2", "--tol", "0", "--device", "cpu",
                             "--json", str(tmp_path / "a" / "b.json"), "--png", ""])
    assert (a.sides, a.batch, a.tol, a.device, a.png) == ([16, 32], 2, 0.0, "cpu", "")
    c = convergence.parse_args(["--methods", "degrad", "solver=broyden", "--ckpt", "--images", "2", "solver.max_iter=9"])
    assert (c.methods, c.ckpt, c.overrides) == (["degrad"], [], ["solver=broyden", "solver.max_iter=9"])
    m = multitask.parse_args(["--out", str(tmp_path / "out")])
    assert m.out == tmp_path / "out"
    assert list(tmp_path.iterdir()) == []  # the paths are checked, not made


def test_every_bench_run_starts_in_a_new_directory(tmp_path):
    first = common.fresh_run_dir(tmp_path)
    (first / "on_exception.ckpt").write_bytes(b"left by a failed run")
    second = common.fresh_run_dir(tmp_path)
    assert first != second and first.parent == second.parent == tmp_path / "runs"
    assert list(second.iterdir()) == []
