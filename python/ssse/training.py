r"""Training recipes: seeded, deterministic procedures that :func:`ssse.retrain` reruns.

A recipe is a callable ``recipe(data, *, seed) -> nn.Module`` that builds a fresh model and
trains it on ``data`` (an ``(X, y)`` pair or an iterable of batches, concatenated). Both
recipes here minimise the regularised empirical risk of paper §3,

.. math:: L(\theta) = \frac{1}{n}\sum_{i=1}^n \ell_i(\theta),\qquad
          \ell_i(\theta) = \mathrm{loss}(f_\theta(x_i), y_i) + \frac{w}{2}\lVert\theta\rVert^2
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ssse_ext.validation import (check_callable, check_data, check_dtype, check_module,
                                 check_nonneg_float, check_positive_float, check_positive_int)

from ._utils import FlatModel, concat_data, per_sample_losses

__all__ = ["sgd_recipe", "lbfgs_recipe", "train_sgd", "train_lbfgs", "objective"]


def objective(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
              weight_decay: float = 0.0) -> torch.Tensor:
    r"""The mean regularised loss :math:`\frac{1}{n}\sum_i \ell_i(\theta)` on one batch."""
    loss = per_sample_losses(loss_fn, model(x), y).mean()
    if weight_decay:
        loss = loss + 0.5 * weight_decay * sum((p * p).sum() for p in model.parameters()
                                               if p.requires_grad)
    return loss


def train_sgd(model: nn.Module, loss_fn, data, *, epochs: int, lr: float, batch_size: int,
              weight_decay: float = 0.0, momentum: float = 0.0, seed: int = 0,
              progress: bool = False) -> nn.Module:
    """Trains ``model`` in place with mini-batch SGD on shuffled data (the shuffling is seeded
    by ``seed``) and returns it in eval mode; ``progress`` shows a bar over the steps."""
    check_module(model)
    check_callable(loss_fn, "loss_fn")
    epochs = check_positive_int(epochs, "epochs")
    lr = check_positive_float(lr, "lr")
    batch_size = check_positive_int(batch_size, "batch_size")
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    momentum = check_nonneg_float(momentum, "momentum")
    fm = FlatModel(model)
    x, y = concat_data(data, "data", device=fm.device, dtype=fm.dtype)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                          momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    steps = -(-x.shape[0] // batch_size)
    bar = tqdm(total=epochs * steps, unit="step", desc="SGD", disable=not progress, leave=False)
    model.train()
    try:
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen).to(fm.device)
            for i in range(0, x.shape[0], batch_size):
                idx = order[i:i + batch_size]
                opt.zero_grad(set_to_none=True)
                objective(model, loss_fn, x[idx], y[idx], weight_decay).backward()
                opt.step()
                bar.update(1)
    finally:
        bar.close()
    return model.eval()


def train_lbfgs(model: nn.Module, loss_fn, data, *, weight_decay: float = 0.0,
                max_iter: int = 1000, tolerance: float = 1e-10) -> nn.Module:
    r"""Minimises the full-batch objective with L-BFGS (strong Wolfe line search) until the
    gradient's largest entry is below ``tolerance``: for convex models (e.g. L2-regularised
    logistic regression) this is the optimum :math:`\theta^*` to that tolerance. Trains in place
    and returns the model in eval mode."""
    check_module(model)
    check_callable(loss_fn, "loss_fn")
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    max_iter = check_positive_int(max_iter, "max_iter")
    tolerance = check_positive_float(tolerance, "tolerance")
    fm = FlatModel(model)
    x, y = concat_data(data, "data", device=fm.device, dtype=fm.dtype)
    model.eval()
    opt = torch.optim.LBFGS(fm.params, lr=1.0, max_iter=max_iter, history_size=50,
                            tolerance_grad=tolerance, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = objective(model, loss_fn, x, y, weight_decay)
        loss.backward()
        return loss

    best = float("inf")
    for _ in range(10):  # L-BFGS may stop early on a flat line search: restart its memory
        opt.step(closure)
        closure()
        gmax = max(float(p.grad.abs().max()) for p in fm.params)
        if gmax <= tolerance or gmax > 0.5 * best:
            break
        best = gmax
        opt = torch.optim.LBFGS(fm.params, lr=1.0, max_iter=max_iter, history_size=50,
                                tolerance_grad=tolerance, tolerance_change=0.0,
                                line_search_fn="strong_wolfe")
    opt.zero_grad(set_to_none=True)
    return model


def _recipe(model_fn, device, dtype, train):
    """``recipe(data, *, seed)``: ``model_fn()`` initialised under ``torch.manual_seed(seed)``
    on ``device`` in ``dtype``, then ``train(model, data, seed)``."""
    def recipe(data, *, seed: int) -> nn.Module:
        check_data(data, "data")
        torch.manual_seed(seed)
        model = model_fn()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_fn must return a torch.nn.Module, got "
                            f"{type(model).__name__}")
        return train(model.to(device=device, dtype=dtype), data, seed)

    return recipe


def sgd_recipe(model_fn: Callable[[], nn.Module], loss_fn, *, epochs: int, lr: float,
               batch_size: int, weight_decay: float = 0.0, momentum: float = 0.0,
               device=None, dtype: torch.dtype | None = None, progress: bool = False):
    """A recipe: ``model_fn()`` initialised under ``torch.manual_seed(seed)``, then
    :func:`train_sgd` with shuffling seeded by ``seed`` (``progress``: a bar over the steps).

    Returns:
        ``recipe(data, *, seed) -> nn.Module``.
    """
    check_callable(model_fn, "model_fn")
    check_callable(loss_fn, "loss_fn")
    check_positive_int(epochs, "epochs")
    check_positive_float(lr, "lr")
    check_positive_int(batch_size, "batch_size")
    check_nonneg_float(weight_decay, "weight_decay")
    check_nonneg_float(momentum, "momentum")
    check_dtype(dtype)

    return _recipe(model_fn, device, dtype, lambda model, data, seed: train_sgd(
        model, loss_fn, data, epochs=epochs, lr=lr, batch_size=batch_size,
        weight_decay=weight_decay, momentum=momentum, seed=seed, progress=progress))


def lbfgs_recipe(model_fn: Callable[[], nn.Module], loss_fn, *, weight_decay: float = 0.0,
                 max_iter: int = 1000, tolerance: float = 1e-10, device=None,
                 dtype: torch.dtype | None = torch.float64):
    """A recipe for convex models: ``model_fn()`` initialised under ``torch.manual_seed(seed)``
    (in float64 by default), then :func:`train_lbfgs` to ``tolerance``.

    Returns:
        ``recipe(data, *, seed) -> nn.Module``.
    """
    check_callable(model_fn, "model_fn")
    check_callable(loss_fn, "loss_fn")
    check_nonneg_float(weight_decay, "weight_decay")
    check_positive_int(max_iter, "max_iter")
    check_positive_float(tolerance, "tolerance")
    check_dtype(dtype)

    return _recipe(model_fn, device, dtype, lambda model, data, seed: train_lbfgs(
        model, loss_fn, data, weight_decay=weight_decay, max_iter=max_iter,
        tolerance=tolerance))
