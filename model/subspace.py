"""The directions of each MLP's hidden space that ordinary text uses, kept free of the slow level.

A LoRA delta B·A changes a layer's MLP output by B(A h). If A's rows are orthogonal to the
directions that hidden states h of ordinary text span, that text passes through unchanged
whatever B learns (null-space projection, as in knowledge-editing work such as AlphaEdit); what
a user taught has to be written in the directions that remain.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backbone import Transformer


class _HiddenGram:
    """`LevelHooks` that sums h hᵀ of the MLP hidden states of the given layers, changing nothing."""

    def __init__(self, layers: dict[int, int], dim: int):
        self.layers = layers
        self.gram = torch.zeros(len(layers), dim, dim)

    def after_attention(self, layer: int, x: Tensor) -> Tensor:
        return x

    def mlp_delta(self, layer: int, h: Tensor) -> None:
        i = self.layers.get(layer)
        if i is not None:
            flat = h.reshape(-1, h.shape[-1]).float()
            self.gram[i] += flat.T @ flat
        return None


def protected_bases(model: Transformer, layers: tuple[int, ...], windows: list[Tensor], energy: float) -> list[Tensor]:
    """Per layer, an orthonormal basis (F, k) of the hidden directions holding `energy` of the
    second moment of ordinary text (`windows`: (1, T) token tensors), largest first."""
    hooks = _HiddenGram({layer: i for i, layer in enumerate(layers)}, model.config.hidden_dim)
    with torch.inference_mode():
        for window in windows:
            model(window, hooks)
    bases = []
    for gram in hooks.gram:
        values, vectors = torch.linalg.eigh(gram.double())  # ascending
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        k = int((values.cumsum(0) < energy * values.sum()).sum()) + 1
        bases.append(vectors[:, :k].float().contiguous())
    return bases


def project_out(a: Tensor, origin: Tensor, bases: list[Tensor]) -> Tensor:
    """a (L, R, F) with the change from `origin` kept out of each layer's protected directions."""
    change = a - origin
    return origin + torch.stack([c - (c @ u) @ u.T for c, u in zip(change, bases)])
