r"""Training recipes: seeded, deterministic procedures that :func:`ssse.retrain` reruns.

A recipe is a callable ``recipe(data, *, seed) -> nn.Module`` that builds a fresh model and
trains it on ``data`` (an ``(X, y)`` pair or an iterable of batches, concatenated). Both
recipes here minimise the regularised empirical risk of paper §3,

.. math:: L(\theta) = \frac{1}{n}\sum_{i=1}^n \ell_i(\theta),\qquad
          \ell_i(\theta) = \mathrm{loss}(f_\theta(x_i), y_i) + \frac{w}{2}\lVert\theta\rVert^2
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ssse_ext.validation import (check_callable, check_dtype, check_nonneg_float,
                                 check_positive_float, check_positive_int)

from .batches import (batch_len, batch_slice, check_data, check_loss, check_module, run_model,
                      task_of)
from .model import FlatModel, concat_data, per_sample_losses

__all__ = ["ConvergenceWarning", "sgd_recipe", "lbfgs_recipe", "train_sgd", "train_lbfgs",
           "objective"]

#: The largest d for which :func:`train_lbfgs` polishes with exact Newton steps: the dense
#: Hessian (d^2 numbers, d Hessian-vector products) costs less than the L-BFGS run up to here.
NEWTON_POLISH_MAX_DIM = 2048


class ConvergenceWarning(RuntimeWarning):
    """A training recipe stopped above its tolerance."""


def objective(model: nn.Module, loss_fn, x, y, weight_decay: float = 0.0) -> torch.Tensor:
    r"""The mean regularised loss :math:`\frac{1}{n}\sum_i \ell_i(\theta)` on one batch
    (inputs ``x``, targets ``y``; see :mod:`ssse.batches`)."""
    task = task_of(loss_fn)
    out = task.forward(model, x) if task is not None else run_model(model, x)
    loss = per_sample_losses(loss_fn, out, y).mean()
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
    check_loss(loss_fn)
    epochs = check_positive_int(epochs, "epochs")
    lr = check_positive_float(lr, "lr")
    batch_size = check_positive_int(batch_size, "batch_size")
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    momentum = check_nonneg_float(momentum, "momentum")
    fm = FlatModel(model, loss_fn=loss_fn)
    x, y = concat_data(data, "data", device=fm.device, dtype=fm.dtype, task=fm.task)
    n = batch_len(y)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                          momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    steps = -(-n // batch_size)
    bar = tqdm(total=epochs * steps, unit="step", desc="SGD", disable=not progress, leave=False)
    model.train()
    try:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(fm.device)
            for i in range(0, n, batch_size):
                idx = order[i:i + batch_size]
                opt.zero_grad(set_to_none=True)
                objective(model, loss_fn, batch_slice(x, idx), batch_slice(y, idx),
                          weight_decay).backward()
                opt.step()
                bar.update(1)
    finally:
        bar.close()
    return model.eval()


def train_lbfgs(model: nn.Module, loss_fn, data, *, weight_decay: float = 0.0,
                max_iter: int = 1000, tolerance: float = 1e-10,
                newton_steps: int = 8) -> nn.Module:
    r"""Minimises the full-batch objective with L-BFGS (strong Wolfe line search), then polishes
    with up to ``newton_steps`` exact Newton steps (models with at most
    :data:`NEWTON_POLISH_MAX_DIM` trainable parameters), until the gradient's largest entry is
    below ``tolerance``. For convex models (e.g. L2-regularised logistic regression) the result
    is the optimum :math:`\theta^*` to rounding: L-BFGS alone stalls where its line search can
    no longer resolve a decrease of the objective (a gradient of about
    :math:`\sqrt{2\lambda u |L|}`, 1e-9 in float64), while Newton steps converge quadratically
    down to the rounding of the gradient itself. Warns with :class:`ConvergenceWarning` when the
    result is above ``tolerance``. Trains in place and returns the model in eval mode."""
    check_module(model)
    check_loss(loss_fn)
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    max_iter = check_positive_int(max_iter, "max_iter")
    tolerance = check_positive_float(tolerance, "tolerance")
    if isinstance(newton_steps, bool) or not isinstance(newton_steps, int) or newton_steps < 0:
        raise ValueError(f"newton_steps must be a non-negative int, got {newton_steps!r}")
    fm = FlatModel(model, loss_fn=loss_fn)
    x, y = concat_data(data, "data", device=fm.device, dtype=fm.dtype, task=fm.task)
    model.eval()

    def new_optimizer():
        return torch.optim.LBFGS(fm.params, lr=1.0, max_iter=max_iter, history_size=50,
                                 tolerance_grad=tolerance, tolerance_change=0.0,
                                 line_search_fn="strong_wolfe")

    opt = new_optimizer()

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = objective(model, loss_fn, x, y, weight_decay)
        loss.backward()
        return loss

    best = float("inf")
    gmax = best
    for _ in range(10):  # L-BFGS may stop early on a flat line search: restart its memory
        opt.step(closure)
        closure()
        gmax = max(float(p.grad.abs().max()) for p in fm.params)
        if gmax <= tolerance or gmax > 0.5 * best:
            break
        best = gmax
        opt = new_optimizer()
    opt.zero_grad(set_to_none=True)
    if newton_steps and fm.dim <= NEWTON_POLISH_MAX_DIM:
        gmax = _newton_polish(fm, loss_fn, x, y, weight_decay, newton_steps)
    if not gmax <= tolerance:
        warnings.warn(f"train_lbfgs stopped with the gradient's largest entry at {gmax:.3g}, "
                      f"above tolerance={tolerance:g} (d = {fm.dim}); the model is not the "
                      "optimum to that tolerance", ConvergenceWarning, stacklevel=2)
    return model


def _newton_polish(fm: FlatModel, loss_fn, x, y, weight_decay: float, steps: int) -> float:
    """Exact Newton steps on the full-batch objective, each kept only if it lowers the
    gradient's norm (near the optimum the objective's own decrease is below its rounding);
    writes the best point into the model and returns its gradient's largest entry."""
    def f(theta):
        out = fm(fm.unflatten(theta), x)
        loss = per_sample_losses(loss_fn, out, y).mean()
        return loss + 0.5 * weight_decay * (theta * theta).sum() if weight_decay else loss

    grad_f = torch.func.grad(f)
    theta = fm.flat()
    g = grad_f(theta)
    for _ in range(steps):
        if not bool(torch.isfinite(g).all()) or float(g.abs().max()) == 0.0:
            break
        H = torch.func.jacrev(grad_f)(theta)  # reverse over reverse: no forward-mode AD
        H = 0.5 * (H + H.T)
        chol, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:  # not locally convex: Newton's direction is not a descent one
            break
        step = torch.cholesky_solve(-g.unsqueeze(1), chol).squeeze(1)
        candidate = theta + step
        g_new = grad_f(candidate)
        if not float(g_new.norm()) < float(g.norm()):
            break
        theta, g = candidate, g_new
    fm.write(theta)
    return float(g.abs().max())


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
    check_loss(loss_fn)
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
                 max_iter: int = 1000, tolerance: float = 1e-10, newton_steps: int = 8,
                 device=None, dtype: torch.dtype | None = torch.float64):
    """A recipe for convex models: ``model_fn()`` initialised under ``torch.manual_seed(seed)``
    (in float64 by default), then :func:`train_lbfgs` to ``tolerance`` (polished with up to
    ``newton_steps`` Newton steps).

    Returns:
        ``recipe(data, *, seed) -> nn.Module``.
    """
    check_callable(model_fn, "model_fn")
    check_loss(loss_fn)
    check_nonneg_float(weight_decay, "weight_decay")
    check_positive_int(max_iter, "max_iter")
    check_positive_float(tolerance, "tolerance")
    check_dtype(dtype)

    return _recipe(model_fn, device, dtype, lambda model, data, seed: train_lbfgs(
        model, loss_fn, data, weight_decay=weight_decay, max_iter=max_iter,
        tolerance=tolerance, newton_steps=newton_steps))
