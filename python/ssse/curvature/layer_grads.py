r"""Per-sample gradients of linear layers from one batched forward and backward pass.

For a linear layer :math:`z = W a + b` applied at positions :math:`t` (tokens, say), sample
:math:`i`'s gradient is :math:`\nabla_W \ell_i = \sum_t g_{i,t} a_{i,t}^\top` and
:math:`\nabla_b \ell_i = \sum_t g_{i,t}`, with :math:`a` the layer's input and
:math:`g = \partial(\sum_j \ell_j)/\partial z` its output gradient: when samples do not
interact (a model in eval mode), :math:`g_{i,t} = \partial \ell_i / \partial z_{i,t}`. So one
pass of the whole batch gives every sample's gradient, where ``vmap`` cannot batch the model
(data-dependent control flow, as in Hugging Face attention masks). This engine serves models
whose selected parameters are all weights and biases of ``nn.Linear`` layers, or of the
``Conv1D`` layers of GPT-2-style models (weight stored ``(in, out)``): LoRA adapters, heads,
projections.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["captured_calls", "layer_gradients", "layer_kind", "linear_owners"]


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"`` for an ``nn.Linear``, ``"conv1d"`` for a GPT-2-style ``Conv1D`` (weight
    stored ``(in, out)``), else ``None``."""
    if isinstance(module, nn.Linear):
        return "linear"
    # transformers' Conv1D: y = x @ W + b with W of shape (in, out)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        return "conv1d"
    return None


def linear_owners(model: nn.Module, names) -> dict[str, tuple[str, str]] | None:
    """``{module path: (kind, which)}`` for the parameter ``names`` when each is the weight or
    bias of a supported layer (``which``: ``"weight"``, ``"bias"`` or ``"both"``), else
    ``None``."""
    modules = dict(model.named_modules())
    owners: dict[str, tuple[str, str]] = {}
    for name in names:
        path, _, attr = name.rpartition(".")
        module = modules.get(path)
        kind = None if module is None else layer_kind(module)
        if kind is None or attr not in ("weight", "bias"):
            return None
        _, held = owners.get(path, (kind, None))
        owners[path] = (kind, attr if held in (None, attr) else "both")
    return owners


def captured_calls(fm, paths, loss_of, params: dict, *, directions=None
                   ) -> tuple[torch.Tensor, list, tuple]:
    r"""One forward and one backward pass of ``loss_of(leaves)`` (the ``(m,)`` per-sample losses
    at ``params`` made leaves that require gradients), capturing every call of the modules at
    ``paths``: ``(losses, [(path, input, output), ...], output gradients)`` (``None`` for an
    output the losses do not reach).

    With ``directions``, ``loss_of`` returns the ``(m, c)`` outputs :math:`z` instead and
    ``directions(z)`` (detached) gives ``(m, c, r)`` vectors :math:`b_{i,j}`: one backward pass
    per :math:`j` of :math:`\sum_i b_{i,j}^\top z_i`, and the output gradients are a list of
    ``r`` such tuples (samples must not interact)."""
    modules = dict(fm.model.named_modules())
    seen: dict[str, list] = {path: [] for path in paths}
    handles = []
    for path in seen:
        def hook(_module, inputs, output, path=path):
            seen[path].append((inputs[0].detach(), output))
        handles.append(modules[path].register_forward_hook(hook))
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    try:
        with torch.enable_grad():
            losses = loss_of(leaves)
            calls = [(path, a, z) for path, hits in seen.items() for a, z in hits]
            outputs = [z for _, _, z in calls]
            if directions is None:
                grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True) \
                    if calls else ()
            else:
                dirs = directions(losses.detach()).to(losses.dtype)
                r = dirs.shape[-1]
                grads = [torch.autograd.grad(losses, outputs, grad_outputs=dirs[..., j],
                                             allow_unused=True, retain_graph=j + 1 < r)
                         if calls else () for j in range(r)]
    finally:
        for h in handles:
            h.remove()
    return losses, calls, grads


def layer_gradients(fm, owners: dict, sample_loss, params: dict, x, y) -> torch.Tensor:
    """``(m, d)`` per-sample gradients of the ``m`` samples of ``(x, y)`` in ``fm``'s flat
    order, from one forward and one backward pass; ``sample_loss(params, x, y)`` returns the
    ``(m,)`` per-sample losses. ``owners``: :func:`linear_owners` of ``fm.names``."""
    losses, calls, grads = captured_calls(fm, owners, lambda leaves: sample_loss(leaves, x, y),
                                          params)
    m = losses.shape[0]
    per: dict[str, torch.Tensor] = {}
    for (path, a, z), g in zip(calls, grads):
        if g is None:
            continue
        a2, g2 = a.reshape(m, -1, a.shape[-1]), g.reshape(m, -1, g.shape[-1])
        kind, _ = owners[path]
        w = torch.bmm(g2.transpose(1, 2), a2) if kind == "linear" else \
            torch.bmm(a2.transpose(1, 2), g2)
        for key, value in ((f"{path}.weight", w), (f"{path}.bias", g2.sum(dim=1))):
            per[key] = value if key not in per else per[key] + value
    out = [per[k].reshape(m, -1) if k in per else
           torch.zeros(m, n, dtype=losses.dtype, device=losses.device)
           for k, n in zip(fm.names, fm.numels)]
    return torch.cat(out, dim=1).detach()
