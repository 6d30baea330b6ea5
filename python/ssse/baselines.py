r"""Baselines with the calling convention of every erasure method,
``method(model, loss_fn, removed, *, ...) -> state_dict`` (as :func:`ssse.ssse_update`): each
returns a new ``state_dict`` and leaves the model untouched unless ``inplace=True`` (on any
error nothing is changed).

- :func:`influence_update`: the influence-function / Newton step of paper eq. 4 with the true
  Hessian, exact per block.
- :func:`fisher_forgetting`: Fisher forgetting of Golatkar, Achille & Soatto (CVPR 2020).
- :func:`gradient_ascent`: one gradient-ascent step on the removed samples.
- :func:`retrain`: rerun the training recipe on :math:`D \setminus S` (the gold standard).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import grad, jacrev

import ssse_ext
from ssse_ext.validation import (check_callable, check_choice, check_int, check_nonneg_float,
                                 check_nonneg_int, check_positive_float, check_positive_int)

from .batches import (batch_len, batch_slice, check_data, check_loss, check_module,
                      check_reiterable, task_of)
from .model import (BATCH_SIZE, FlatModel, available_memory, finish_update, iter_batches,
                     per_sample_losses, warn_if_training)
from .curvature import check_likelihood
from .gradients import gradient_sum
from .rows import row_stream

__all__ = ["influence_update", "fisher_forgetting", "gradient_ascent", "retrain",
           "block_hessians"]

HESSIAN_VARIANTS = ("retained", "full")
#: The diagonal Fishers of :func:`fisher_forgetting`, by the curvature whose rows they square:
#: the true Fisher is the Gauss–Newton matrix of the likelihood.
FISHER_KINDS = {"true": "ggn", "empirical": "empirical"}

# influence_update holds, per block of s parameters, the float64 Hessian block, its
# column-chunked construction and the solve's LU copy: this many s x s float64 matrices.
_HESSIAN_COPIES = 3


def _check_hessian_memory(layout: ssse_ext.BlockLayout, device: torch.device,
                          max_memory: int | None):
    s = layout.max_block_size
    per_element = _HESSIAN_COPIES * 8  # float64
    need = per_element * s * s
    limit = available_memory(device) if max_memory is None else int(max_memory)
    if need > limit:
        raise MemoryError(
            f"influence_update: a {s} x {s} Hessian block needs about {need / 2**30:.2f} GiB in "
            f"float64 but only {limit / 2**30:.2f} GiB are available on {device}; pass a smaller "
            f"block_size (e.g. {max(1, int(math.sqrt(limit / per_element)))})")


def block_hessians(model: nn.Module, loss_fn, datasets, layout: ssse_ext.BlockLayout, *,
                   weight_decay: float = 0.0, chunk_size: int = 64, with_count: bool = False):
    r"""The diagonal blocks of :math:`\sum_i \nabla^2_\theta \ell_i(\theta)` over the samples of
    every data set in ``datasets``, in float64 (``torch.func``: ``jacrev`` of ``grad``, in
    chunks of ``chunk_size`` columns); with ``with_count`` also the number of samples."""
    fm = FlatModel(model, loss_fn=loss_fn)
    theta = fm.flat(dtype=torch.float64)
    frozen = fm.frozen_dict(torch.float64)
    blocks = [torch.zeros(s, s, dtype=torch.float64, device=fm.device) for s in layout.sizes]
    count = 0
    for name, data in datasets:
        for x, y in iter_batches(data, name, batch_size=BATCH_SIZE, device=fm.device,
                                 dtype=torch.float64, task=fm.task):
            if batch_len(y) == 0:
                continue
            count += batch_len(y)
            for b in range(layout.num_blocks):
                sl = layout.slice(b)

                def block_loss(tb):
                    t = torch.cat([theta[:sl.start], tb, theta[sl.stop:]])
                    return per_sample_losses(loss_fn, fm(fm.unflatten(t), x, frozen), y).sum()

                blocks[b] += jacrev(grad(block_loss), chunk_size=chunk_size)(theta[sl])
    if weight_decay:
        for blk in blocks:
            blk.diagonal().add_(weight_decay * count)
    return (blocks, count) if with_count else blocks


def influence_update(model: nn.Module, loss_fn, removed, *, retained,
                     weight_decay: float = 0.0, hessian: str = "retained",
                     block_size: int | None = None, max_memory: int | None = None,
                     inplace: bool = False) -> dict:
    r"""The influence-function update of paper eq. 4 with the true Hessian:

    .. math:: \hat\theta = \theta^* + \frac{1}{n-k}\,H_C^{-1} \sum_{i\in S}\nabla\ell_i(\theta^*),
              \qquad H_C = \frac{1}{|C|}\sum_{i \in C} \nabla^2 \ell_i(\theta^*)

    with :math:`C = D \setminus S` (``hessian="retained"``: one Newton step on the retained
    objective, exact for a quadratic loss) or :math:`C = D` (``"full"``: eq. 4 with the Hessian
    of the training set, as the paper writes it, keeping the factor :math:`1/(n-k)`).
    Replacing :math:`H_C^{-1}` by :math:`\varepsilon F_D^{-1}` gives SSSE (eq. 8). The Hessian
    is formed exactly per block (``torch.func``) and solved in float64.

    Args:
        model: the trained model (:math:`\theta^*`).
        loss_fn: per-sample loss, as in :func:`ssse.per_sample_grads`.
        removed: :math:`S`, an ``(X, y)`` pair or an iterable of batches.
        retained: :math:`D \setminus S`, likewise.
        weight_decay: L2 coefficient folded into every :math:`\ell_i`.
        hessian: ``"retained"`` or ``"full"``.
        block_size: ``B`` of a fixed block layout; default one block of all ``d`` parameters
            (the exact Hessian).
        max_memory: bytes allowed for one block (default: the memory available now); a larger
            block is refused with a ``MemoryError`` before any work.
        inplace: also write :math:`\hat\theta` into the model.

    Returns:
        A new ``state_dict``.
    """
    check_module(model)
    check_loss(loss_fn)
    check_data(removed, "removed", task_of(loss_fn))
    check_data(retained, "retained", task_of(loss_fn))
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    check_choice(hessian, "hessian", HESSIAN_VARIANTS)
    if hessian == "full":  # S is read twice: its gradient, then its Hessian
        check_reiterable(removed, "removed", task_of(loss_fn))
    block_size = check_positive_int(block_size, "block_size", allow_none=True)
    if max_memory is not None:
        check_positive_int(max_memory, "max_memory")
    warn_if_training(model, "influence_update")
    fm = FlatModel(model, loss_fn=loss_fn)
    layout = ssse_ext.BlockLayout.fixed(fm.dim, block_size or fm.dim)
    _check_hessian_memory(layout, fm.device, max_memory)

    v, k = gradient_sum(fm, loss_fn, removed, weight_decay=weight_decay,
                        dtype=torch.float64, name="removed")
    if k == 0:
        raise ValueError("removed is empty: nothing to erase")
    sets = [("retained", retained)] + ([("removed", removed)] if hessian == "full" else [])
    blocks, count = block_hessians(model, loss_fn, sets, layout, weight_decay=weight_decay,
                                   with_count=True)
    n = count + k if hessian == "retained" else count
    if n <= k:
        raise ValueError(f"retained is empty: the update needs n > k={k} samples in all")
    # the blocks hold sum_C H_i = |C| H_C: the step (1/(n-k)) H_C^{-1} v is their solve times
    # |C| / (n - k), which is 1 for the retained Hessian
    v = v * (count / (n - k))
    step = torch.empty_like(v)
    for b, blk in enumerate(blocks):
        sl = layout.slice(b)
        try:
            step[sl] = torch.linalg.solve(blk, v[sl])
        except RuntimeError as exc:  # torch.linalg.LinAlgError
            raise ValueError(f"influence_update: the Hessian block {b} (parameters "
                             f"{sl.start}..{sl.stop}) is singular; add weight_decay") from exc
    theta_hat = fm.flat(dtype=torch.float64) + step
    return finish_update(fm, theta_hat, inplace=inplace, what="the influence update")


def _diagonal_fisher(fm: FlatModel, loss_fn, data, kind: str, likelihood) -> torch.Tensor:
    r"""The diagonal :math:`\frac1n\sum_r u_r \odot u_r` of a curvature's matrix over ``data``:
    ``kind`` ``"empirical"`` squares the per-sample gradients, ``"true"`` the Gauss–Newton rows
    of ``likelihood``, :math:`\mathbb E_{y\sim p(y|x)}[(\nabla\log p(y|x))^2]` (for softmax
    outputs :math:`\sum_y p(y|x)(\nabla\log p(y|x))^2`, Golatkar et al.'s loop)."""
    dtype = fm.dtype
    total = torch.zeros(fm.dim, dtype=dtype, device=fm.device)
    n = 0
    info: dict = {}
    for rows in row_stream(fm, loss_fn, data, "retained", weight_decay=0.0, chunk_size=None,
                             minibatch=1, dtype=dtype, curvature=FISHER_KINDS[kind],
                             likelihood=likelihood, info=info):
        total += (rows * rows).sum(0)
        n += rows.shape[0] // info["rows_per_sample"]
    return total / max(n, 1)


def fisher_forgetting(model: nn.Module, loss_fn, removed, *, retained, alpha: float, seed: int,
                      fisher: str = "true", likelihood=None,
                      forget_class: int | None = None, inplace: bool = False) -> dict:
    r"""Fisher forgetting (Golatkar, Achille & Soatto, "Eternal Sunshine of the Spotless Net",
    CVPR 2020): add Gaussian noise shaped by the diagonal Fisher :math:`F` of the retained data,

    .. math:: \hat\theta = \theta^* + \sigma \odot \xi,\quad \xi \sim \mathcal N(0, I),\quad
              \sigma^2 = \alpha\, \min(1/(F + 10^{-8}),\, c)

    with their clamping and shaping, per parameter tensor: :math:`c = 10^3`, or :math:`10^2`
    for the classifier's tensors (first dimension = the number of outputs); for tensors with
    ``ndim > 1`` the variance is averaged over dimension 1; the classifier's tensors and 1-D
    tensors (biases, BatchNorm) get 10x the variance. With ``forget_class`` the classifier's
    row of that class is zeroed with variance 1e-4 before the classifier's 10x (1e-3 in all), as in
    their class-removal code.

    Args:
        model: the trained model; loss_fn: per-sample loss (used by ``fisher="empirical"``).
        removed: :math:`S`. The method itself needs only :math:`D \setminus S`; ``removed``
            keeps the signature every erasure method shares and is checked to be data, or
            may be ``None``.
        retained: :math:`D \setminus S`.
        alpha: noise scale :math:`\alpha > 0` (they use 1e-6 .. 1e-8).
        seed: seeds the noise (same seed, same result).
        fisher: ``"true"`` (theirs: the expectation over the model's predictive distribution,
            :math:`\sum_y p(y|x)\,(\nabla\log p(y|x))^2`) or ``"empirical"`` (squared
            per-sample gradients of ``loss_fn`` at the labels).
        likelihood: the model's output distribution for ``fisher="true"``: ``None`` (default)
            infers it from ``loss_fn``, a name (``"categorical"``: softmax logits,
            ``"bernoulli"``: independent sigmoid logits, e.g. multi-attribute) or a
            :class:`ssse.curvature.Likelihood` is checked against it (as in
            :func:`ssse.fit_inverse_fisher`).
        forget_class: the removed class, or ``None``.
        inplace: also write the result into the model.

    Returns:
        A new ``state_dict``.
    """
    check_module(model)
    check_loss(loss_fn)
    if removed is not None:
        check_data(removed, "removed", task_of(loss_fn))
    check_reiterable(retained, "retained", task_of(loss_fn))
    alpha = check_positive_float(alpha, "alpha")
    seed = check_int(seed, "seed")
    check_choice(fisher, "fisher", tuple(FISHER_KINDS))
    check_likelihood(likelihood)
    if forget_class is not None:
        check_nonneg_int(forget_class, "forget_class")
    warn_if_training(model, "fisher_forgetting")
    fm = FlatModel(model, loss_fn=loss_fn)
    first = next((b for b in iter_batches(retained, "retained", batch_size=1, device=fm.device,
                                          dtype=fm.dtype, task=fm.task)
                  if batch_len(b[1])), None)
    if first is None:
        raise ValueError("retained is empty: the Fisher needs at least one sample")
    diag = _diagonal_fisher(fm, loss_fn, retained, fisher, likelihood)
    with torch.no_grad():
        num_outputs = fm(fm.param_dict(), batch_slice(first[0], slice(0, 1))).reshape(1, -1).shape[1]
    if forget_class is not None and forget_class >= num_outputs:
        raise ValueError(f"forget_class={forget_class} but the model has {num_outputs} outputs")

    gen = torch.Generator(device=fm.device).manual_seed(seed)
    new = []
    for p, f in zip(fm.params, torch.split(diag, fm.numels)):
        f = f.reshape(p.shape)
        classifier = p.dim() >= 1 and p.shape[0] == num_outputs
        var = (1.0 / (f + 1e-8)).clamp(max=1e3)
        if classifier:
            var = var.clamp(max=1e2)
        var = alpha * var
        if p.dim() > 1:
            var = var.mean(dim=1, keepdim=True).expand_as(p).clone()
        mu = p.detach().clone()
        if classifier and forget_class is not None:
            mu[forget_class] = 0
            var[forget_class] = 1e-4
        if classifier or p.dim() == 1:
            var = var * 10
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
        new.append((mu + var.sqrt() * noise).reshape(-1))
    return finish_update(fm, torch.cat(new), inplace=inplace, what="Fisher forgetting")


def gradient_ascent(model: nn.Module, loss_fn, removed, *, lr: float, weight_decay: float = 0.0,
                    inplace: bool = False) -> dict:
    r"""One gradient-ascent step on the removed samples:

    .. math:: \hat\theta = \theta^* + \eta\,\frac{1}{k}\sum_{i\in S}\nabla\ell_i(\theta^*)

    Args:
        model, loss_fn, removed, weight_decay: as in :func:`ssse.ssse_update`.
        lr: step size :math:`\eta > 0`.
        inplace: also write the result into the model.

    Returns:
        A new ``state_dict``.
    """
    check_module(model)
    check_loss(loss_fn)
    check_data(removed, "removed", task_of(loss_fn))
    lr = check_positive_float(lr, "lr")
    weight_decay = check_nonneg_float(weight_decay, "weight_decay")
    warn_if_training(model, "gradient_ascent")
    fm = FlatModel(model, loss_fn=loss_fn)
    g, k = gradient_sum(fm, loss_fn, removed, weight_decay=weight_decay, name="removed")
    if k == 0:
        raise ValueError("removed is empty: nothing to erase")
    return finish_update(fm, fm.flat() + lr * g / k, inplace=inplace, what="gradient ascent")


def retrain(recipe, data, *, seed: int) -> nn.Module:
    r"""Retrains from scratch on :math:`D \setminus S`: the gold standard :math:`\theta^*_{-S}`.

    Calls ``recipe(data, seed=seed)`` with torch's global random state seeded by ``seed`` (and
    restored afterwards), so that rerunning the recipe that produced :math:`\theta^*` with the
    same seed differs only in the data.

    Args:
        recipe: ``recipe(data, *, seed) -> nn.Module``, e.g. :func:`ssse.training.sgd_recipe`
            or :func:`ssse.training.lbfgs_recipe`.
        data: :math:`D \setminus S`.
        seed: the seed of the original training run.

    Returns:
        The retrained model.
    """
    check_callable(recipe, "recipe")
    check_data(data, "data")
    seed = check_int(seed, "seed")
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = recipe(data, seed=seed)
    if not isinstance(model, nn.Module):
        raise TypeError(f"recipe must return a torch.nn.Module, got {type(model).__name__}")
    return model
