"""True operator-norm normalisation of a convolution (not of its reshaped kernel matrix)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize


class ConvOperatorNorm(nn.Module):
    """Parametrization W -> gamma * W / ||conv_W||, with ||conv_W|| the operator norm of the
    convolution (its padding included) on inputs of the layer's spatial size, estimated by power
    iteration on conv and its adjoint (zero padding: conv_transpose2d with the same padding; circular
    padding: the circular convolution with the transposed, flipped kernel; both exact for stride 1).

    The right singular vector ``v`` persists in a buffer, so one iteration per training forward
    keeps the estimate tight (as ``torch.nn.utils.spectral_norm`` does for the kernel matrix);
    ``n_iter_init`` iterations run when the input size changes. The size is that of the layer's
    previous call (``size`` before the first), recorded by a forward pre-hook.
    The gradient flows through sigma = ||conv_W v|| with v held constant.
    """

    def __init__(self, conv: nn.Conv2d, gamma: float, size: tuple[int, int] = (32, 32), n_iter: int = 1,
                 n_iter_init: int = 50):
        super().__init__()
        if conv.stride not in (1, (1, 1)) or conv.groups != 1:
            raise ValueError("ConvOperatorNorm: stride-1, ungrouped convolutions only")
        if conv.padding_mode not in ("zeros", "circular"):
            raise ValueError(f"ConvOperatorNorm: padding_mode 'zeros' or 'circular', got {conv.padding_mode!r}")
        self.gamma, self.padding, self.dilation = gamma, conv.padding, conv.dilation
        self.circular = conv.padding_mode == "circular"
        self.in_channels, self.size = conv.in_channels, tuple(size)
        self.n_iter, self.n_iter_init = n_iter, n_iter_init
        self.register_buffer("v", torch.empty(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # v's shape is the input size of the layer's last call, which a freshly built model need not
        # share with the checkpoint: take the saved vector's shape instead of refusing it
        saved = state_dict.get(prefix + "v")
        if saved is not None:
            self.v = torch.empty_like(saved, device=self.v.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _pad_circular(self, x: Tensor) -> Tensor:
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph), mode="circular")

    def _conv(self, x: Tensor, W: Tensor) -> Tensor:
        if self.circular:
            return F.conv2d(self._pad_circular(x), W, dilation=self.dilation)
        return F.conv2d(x, W, padding=self.padding, dilation=self.dilation)

    def _adjoint(self, y: Tensor, W: Tensor) -> Tensor:
        if self.circular:  # adjoint of a circular correlation: correlate with the flipped, transposed kernel
            return F.conv2d(self._pad_circular(y), W.transpose(0, 1).flip(-2, -1), dilation=self.dilation)
        return F.conv_transpose2d(y, W, padding=self.padding, dilation=self.dilation)

    def forward(self, W: Tensor) -> Tensor:
        shape = (1, self.in_channels, *self.size)
        fresh = tuple(self.v.shape) != shape
        if fresh or self.training:
            with torch.no_grad():
                v = torch.randn(shape, dtype=W.dtype, device=W.device) if fresh else self.v.to(W.dtype)
                for _ in range(self.n_iter_init if fresh else self.n_iter):
                    v = self._adjoint(self._conv(v, W), W)
                    v = v / v.norm().clamp_min(1e-30)
                self.v = v
        sigma = self._conv(self.v.to(W.dtype), W).norm()
        return self.gamma * W / sigma


def operator_norm_conv(conv: nn.Conv2d, gamma: float, size: tuple[int, int] = (32, 32)) -> nn.Conv2d:
    """Register :class:`ConvOperatorNorm` on ``conv.weight`` and a pre-hook that records the input size."""
    norm = ConvOperatorNorm(conv, gamma, size)
    parametrize.register_parametrization(conv, "weight", norm)

    def record(module, args):
        norm.size = tuple(args[0].shape[-2:])

    conv.register_forward_pre_hook(record)
    return conv
