"""Speed switches of a run: ``channels_last`` and ``compile`` (mixed precision is Lightning's ``trainer.precision``).

Each changes how the same computation runs, not what it computes: tests/test_speed_switches.py checks on CPU that
each gives the default's PSNR within a stated tolerance. Their speed on a GPU has not been measured (docs/operations.md,
"Speed switches").
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..methods.base import Equilibrium
from .errors import ConfigError
from .module import ReconstructionModule

log = logging.getLogger(__name__)


def apply_speed_switches(module: ReconstructionModule, channels_last: bool = False, compile: bool = False) -> None:
    """``channels_last``: the method's 4-D weights and every batch of images in NHWC memory format (PyTorch's
    recipe: model and inputs; convolutions then run NHWC, which tensor cores prefer).
    ``compile``: :func:`compile_iteration_map`. Raises ConfigError for a method that cannot be compiled."""
    if channels_last:
        module.method.to(memory_format=torch.channels_last)
        module.channels_last = True
    if compile:
        compile_iteration_map(module.method)


def compile_iteration_map(method: nn.Module) -> list[str]:
    """``torch.compile`` the network inside the method's iteration map, in place (the state-dict keys stay as
    they are, so checkpoints load either way): ``method.net`` (DE-GRAD, DE-Prox, LU-DnCNN), or each LUSER block's
    recursive ``step``. The map itself is a fresh closure over each batch's measurement: compiled whole, it would
    recompile for every batch, so the network, the part that costs, is compiled. Returns what was compiled.

    A compiled graph has no double backward: implicit differentiation solved by ``cg`` (the double-vjp trick) is
    refused; the Lipschitz estimates, which use it too, run eagerly (ReconstructionModule.validation_step)."""
    solve = getattr(method, "solve", None)
    if isinstance(solve, Equilibrium) and solve.mode == "implicit" and \
            solve.backward_options.get("backward_solver") == "cg":
        raise ConfigError("compile=true: backward.backward_solver=cg differentiates twice through the network, which "
                          "a compiled graph cannot; use backward.backward_solver=anderson or compile=false")
    net = getattr(method, "net", None)
    if isinstance(net, nn.Module):
        net.compile()
        return ["net"]
    blocks = getattr(method, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and all(callable(getattr(b, "step", None)) for b in blocks):
        for b in blocks:
            b.step = torch.compile(b.step)  # an instance attribute: the module and its state dict are unchanged
        return [f"blocks.{i}.step" for i in range(len(blocks))]
    raise ConfigError(f"compile=true compiles the network inside the iteration map, but {type(method).__name__} has "
                      f"none (no method.net); drop compile=true")
