"""A source adversary for stage 2: features that tell COVID-19 from normal but not one source from another.

A small head reads the classifier's pooled features together with the true class and predicts the image's
source. Its gradient reaches the network reversed (a gradient reversal layer, Ganin & Lempitsky 2015), so the
network is trained to make the source unpredictable *within each class*: a normal film from a publication
should look, to the features, like a normal film from the archive that supplies most normals. Conditioning on
the class matters here, because the source also predicts the class; an unconditional adversary would remove
the label with it. The adversary's loss weighs every (class, source) cell the same (:func:`sample_weights`
with power 1), so the few normals from minority sources are not drowned by the majority.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, negated gradient backward."""
    return _Reverse.apply(x)  # type: ignore[no-any-return]


class SourceAdversary(nn.Module):
    """Predicts the source (``groups`` classes) from pooled features (N, F) and the one-hot class (N, 2)."""

    def __init__(self, features: int, groups: int, hidden: int = 64) -> None:
        super().__init__()
        if features < 1 or groups < 2:
            raise ValueError("a source adversary needs features and at least two sources")
        self.net = nn.Sequential(nn.Linear(features + 2, hidden), nn.ReLU(), nn.Linear(hidden, groups))

    def forward(self, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(y.long(), 2).to(features.dtype)
        return self.net(torch.cat([reverse_gradient(features.flatten(1)), onehot], 1))


def adversary_loss(adversary: SourceAdversary, features: torch.Tensor, y: torch.Tensor, groups: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy of the adversary's source prediction (its gradient reaches the features
    reversed). ``weights`` (N,) are per-sample weights, e.g. ``sample_weights(y, groups, 1.0)``."""
    losses = F.cross_entropy(adversary(features.float(), y), groups.long(), reduction="none")
    return (losses * weights).sum() / weights.sum().clamp_min(1e-12)
