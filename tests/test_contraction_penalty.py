"""The contraction penalty (FixedPointMethod.contraction_term) against closed forms on linear maps."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from jfb_ip.methods.base import FixedPointMethod, Reconstruction

SOLVER = {"name": "fixed_point", "tol": 1e-6, "max_iter": 200}


class LinearMap(FixedPointMethod):
    """T(x) = W x per sample: J_T = W everywhere, so Lip(T) = ||W||_2 and its gradient are closed forms."""

    def __init__(self, w: torch.Tensor, **penalty):
        super().__init__(SOLVER, {"mode": "jfb"}, **penalty)
        self.w = nn.Parameter(w.clone())

    def forward(self, b: torch.Tensor) -> Reconstruction:
        f = lambda x: x @ self.w.T + b  # noqa: E731
        x, stats = self.solve(f, torch.zeros_like(b))
        penalty, lip = self.contraction_term(f, x)
        return Reconstruction(x, stats=stats, penalty=penalty, lipschitz=lip)


def matrix(norm: float, d: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, generator=g, dtype=torch.float64)
    return w * norm / torch.linalg.matrix_norm(w, 2)


def test_penalty_and_its_gradient_match_the_singular_value_closed_form():
    w, weight, target = matrix(1.3), 0.7, 0.9
    method = LinearMap(w, contraction_penalty=weight, contraction_target=target, contraction_iters=200).train()
    b = torch.randn(3, 6, dtype=torch.float64)
    rec = method(b)  # Lip 1.3: the solve does not converge; the penalty does not need it to
    u, s, vh = torch.linalg.svd(w)
    assert torch.allclose(rec.lipschitz, s[0].expand(3), rtol=1e-6)
    assert rec.penalty.item() == pytest.approx(weight * (s[0].item() - target) ** 2, rel=1e-6)
    rec.penalty.backward()
    # d sigma_max / dW = u_1 v_1^T (a simple top singular value); the penalty's mean over samples keeps the factor
    expected = weight * 2 * (s[0] - target) * torch.outer(u[:, 0], vh[0])
    assert torch.allclose(method.w.grad, expected, atol=1e-6)


def test_penalty_is_zero_below_the_target_and_off_outside_training():
    method = LinearMap(matrix(0.5), contraction_penalty=1.0, contraction_target=0.9, contraction_iters=50).train()
    b = torch.randn(2, 6, dtype=torch.float64)
    rec = method(b)
    assert rec.penalty.item() == 0.0
    assert rec.lipschitz == pytest.approx([0.5, 0.5], rel=1e-4)
    method.eval()
    rec = method(b)
    assert rec.penalty is None and rec.lipschitz is None
    assert LinearMap(matrix(0.5)).train()(b).penalty is None  # weight 0: off


def test_penalty_enters_the_loss():
    method = LinearMap(matrix(0.5)).train()
    x = torch.zeros(2, 6, dtype=torch.float64)
    rec = Reconstruction(torch.ones(2, 6, dtype=torch.float64), penalty=torch.tensor(0.25, dtype=torch.float64))
    assert rec.loss(x, nn.functional.mse_loss).item() == pytest.approx(1.25)
    del method


def test_minimising_the_penalty_brings_the_map_to_the_target():
    method = LinearMap(matrix(2.0), contraction_penalty=1.0, contraction_target=0.9, contraction_iters=30).train()
    opt = torch.optim.SGD(method.parameters(), lr=0.2)
    b = torch.randn(2, 6, dtype=torch.float64)
    for _ in range(60):
        opt.zero_grad()
        method(b).penalty.backward()
        opt.step()
    assert torch.linalg.matrix_norm(method.w.detach(), 2).item() < 0.95


@pytest.mark.parametrize("bad", [{"contraction_penalty": -1.0}, {"contraction_target": 0.0},
                                 {"contraction_iters": 0}, {"contraction_iters": 2.5}])
def test_bad_penalty_options_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LinearMap(matrix(0.5), **bad)


def test_training_with_the_penalty_logs_it_on_mri(tmp_path):
    """A real run (DE-GRAD on MRI 4x, where the data prox leaves the network alone on unsampled k-space; input
    injection, since the anchored default's untrained map is constant in x, Lip(T) = 0):
    the penalty and the Lip(T) it measured reach the logs, and the logged loss is the MSE plus the penalty."""
    import csv

    from conftest import TINY, compose_cfg, for_task
    from jfb_ip.lit.run import train

    overrides = for_task(TINY, "mri4x") + ["task=mri4x", "method.contraction_penalty=1.0",
                                             "method.inject=input", "logger=csv", "test=false"]
    train(compose_cfg("train", overrides, tmp_path))
    rows = list(csv.DictReader(open(next(tmp_path.glob("csv/**/metrics.csv")))))
    steps = [r for r in rows if r.get("train/contraction_penalty")]
    assert steps, "train/contraction_penalty was not logged"
    for r in steps:
        lip_max, penalty = float(r["train/solver/lipschitz_T_max"]), float(r["train/contraction_penalty"])
        assert 0 < float(r["train/solver/lipschitz_T_mean"]) <= lip_max
        assert penalty >= 0 and (penalty > 0) == (lip_max > 0.9)


def test_a_penalty_that_never_acts_leaves_training_bit_identical(tmp_path):
    """Where every Lip(T) estimate is under the target the penalty and its gradient are 0, so turning it on must not
    change a run at all: the weights after real training steps equal those of a run without it, exactly. (Run
    anyway, its double backward moves the weights by round-off, which on sr4 changes when the anchor gate opens and
    the test PSNR by 0.3 dB.)"""
    from conftest import TINY, compose_cfg
    from jfb_ip.lit.run import train

    weights = []
    for name, extra in (("off", []), ("idle", ["method.contraction_penalty=1.0", "method.contraction_target=1e6"])):
        out = tmp_path / name
        # input injection: the anchored default's untrained map is constant in x (Lip(T) = 0 at the start)
        train(compose_cfg("train", TINY + ["trainer.max_steps=4", "method.inject=input", "test=false"] + extra, out))
        weights.append(torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
