"""Per-sample losses for models whose targets are sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "causal_lm_loss"]

#: The target value of positions that no loss is taken at (padding), as in Hugging Face.
IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""A causal language model's per-sample loss: the *sum* over the sequence of the
    next-token cross-entropies, :math:`\ell_i = -\sum_{t} \log p(y_{i,t+1} \mid y_{i,\le t})`,
    positions labelled :data:`IGNORE_INDEX` excluded (the labels are shifted here, as Hugging
    Face models do). A sum, not a mean: a sample is one sequence, and its loss is its
    negative log-likelihood.

    Args:
        logits: ``(m, T, V)``.
        labels: ``(m, T)`` token ids, :data:`IGNORE_INDEX` where no loss is taken.

    Returns:
        ``(m,)``.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"causal_lm_loss needs logits (m, T, V) and labels (m, T), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    shifted = logits[:, :-1].transpose(1, 2)  # (m, V, T-1): the class dimension second
    token = F.cross_entropy(shifted, labels[:, 1:], ignore_index=IGNORE_INDEX,
                            reduction="none")
    return token.sum(dim=1)
