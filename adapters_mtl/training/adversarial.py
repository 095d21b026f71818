"""Adversarial sharing: a task discriminator trained through a gradient-reversal layer (Ganin & Lempitsky
2015; adversarial MTL, Liu et al. 2017), pushing the shared representation to be task-invariant."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["GradientReversal", "TaskDiscriminator", "grad_reverse"]


class GradientReversal(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``-lambda_``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lambda_ * grad, None


def grad_reverse(x: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """``x`` unchanged going forward; gradients reversed and scaled by ``lambda_`` going back."""
    if lambda_ < 0:
        raise ValueError(f"lambda_ must be >= 0 (the reversal supplies the sign), got {lambda_}")
    return GradientReversal.apply(x, lambda_)


class TaskDiscriminator(nn.Module):
    """Predicts which task a (pooled) shared representation came from, behind a gradient-reversal layer.

    Args:
        hidden_size: width of the representation.
        num_tasks: number of tasks.
        lambda_: reversal strength.
    """

    def __init__(self, hidden_size: int, num_tasks: int, lambda_: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__()
        self.lambda_ = lambda_
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(hidden_size, hidden_size),
            nn.Tanh(),
            nn.Linear(hidden_size, num_tasks),
        )

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        """(B, H) → (B, num_tasks) logits; the shared encoder receives the reversed gradient."""
        return self.net(grad_reverse(shared, self.lambda_))

    def loss(self, shared: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the discriminator on ``task_ids`` (B,)."""
        return nn.functional.cross_entropy(self(shared), task_ids)
