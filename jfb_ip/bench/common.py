"""Helpers shared by the benchmarks."""
from __future__ import annotations

from pathlib import Path

import torch


class SavedBytes:
    """Bytes of the distinct storages saved for backward inside the context, those in ``exclude``
    (addresses counted elsewhere) left out; storages stay referenced until exit, so an address is
    never reused and deduplication by address is exact. Deterministic, unlike a process's RSS."""

    def __init__(self, exclude=()):
        self.exclude = set(exclude)

    def __enter__(self):
        self.seen = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.exclude:
            self.seen.setdefault(s.data_ptr(), s)
        return t

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self.nbytes = sum(s.nbytes() for s in self.seen.values())
        self.seen = {}


def save_figure(fig, path) -> None:
    """tight layout, write the PNG (creating its folder), close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
