"""Small MLP heads on CLIP image embeddings, built from their state dicts.

The layout is LAION's: an ``nn.Sequential`` stored as ``layers``, whose Linear modules sit
at the indices found in the checkpoint (``layers.0.weight``, ``layers.2.weight``, ...);
the modules in between are the activation (NSFW head) or dropout (aesthetic predictor v2,
which has no activation at all). So LAION's released checkpoints load as they are, and
tests save tiny random ones in the same format.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mmloom.errors import UserError


class MLPHead(nn.Module):
    def __init__(self, sizes: dict[int, tuple[int, int]], activation: str = "relu"):
        super().__init__()
        last = max(sizes)
        mods = []
        for i in range(last + 1):
            if i in sizes:
                mods.append(nn.Linear(sizes[i][1], sizes[i][0]))
            else:
                mods.append(nn.ReLU() if activation == "relu" else nn.Identity())
        self.layers = nn.Sequential(*mods)
        self.in_dim = sizes[min(sizes)][1]
        self.out_dim = sizes[last][0]

    @classmethod
    def from_state_dict(cls, sd: dict, activation: str, source: str) -> "MLPHead":
        sizes = {}
        for k, v in sd.items():
            m = re.fullmatch(r"layers\.(\d+)\.weight", k)
            if m:
                sizes[int(m.group(1))] = tuple(v.shape)
        if not sizes:
            raise UserError(f"{source}: not an MLP head checkpoint (no layers.N.weight keys; found {list(sd)[:5]})")
        head = cls(sizes, activation)
        head.load_state_dict(sd)
        return head.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_head(ref: str, kind: str, names: tuple[str, ...], activation: str) -> tuple[MLPHead, str]:
    """An MLP head from a file, a directory holding one of ``names``, or a hub path; returns
    (head, resolved file) so that the scorer can fingerprint it."""
    from mmloom.models import load_state_dict, resolve_file

    path = resolve_file(ref, kind, names)
    return MLPHead.from_state_dict(load_state_dict(path), activation, ref), path


def save_head(path: str, sizes: list[int], activation: str = "relu", seed: int = 0) -> None:
    """A random head in the on-disk format (for tests and the demo). ``sizes`` = [in, h1, ..., out]."""
    torch.manual_seed(seed)
    layout = {}
    idx = 0
    for a, b in zip(sizes[:-1], sizes[1:]):
        layout[idx] = (b, a)
        idx += 2
    torch.save(MLPHead(layout, activation).state_dict(), path)
