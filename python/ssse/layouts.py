"""Block layouts over a model's trainable parameters."""

from __future__ import annotations

import math

from torch import nn

import ssse_ext
from ssse_ext.validation import check_choice, check_positive_int

from .model import FlatModel

__all__ = ["LAYOUTS", "resolve_layout", "row_layout"]

#: Block-layout policies accepted by ``layout=`` (or pass a :class:`ssse_ext.BlockLayout`):
#: ``"per_parameter"`` (no block crosses a parameter tensor), ``"fixed"`` (consecutive chunks
#: of the flat vector, the paper's) and ``"rows"`` (one block per output row of a linear model,
#: the paper's multi-attribute layout).
LAYOUTS = ("per_parameter", "fixed", "rows")

def resolve_layout(layout, block_size: int | None, model_or_shapes) -> ssse_ext.BlockLayout:
    """The :class:`ssse_ext.BlockLayout` for ``layout`` (one of :data:`LAYOUTS` or a
    ``BlockLayout``) over a model's trainable parameters (an ``nn.Module``, a
    :class:`~ssse.model.FlatModel` or the parameters' shapes)."""
    block_size = check_positive_int(block_size, "block_size", allow_none=True)
    module = model_or_shapes.model if isinstance(model_or_shapes, FlatModel) else model_or_shapes
    if isinstance(model_or_shapes, nn.Module):
        model_or_shapes = FlatModel(model_or_shapes)
    shapes = (model_or_shapes.shapes if isinstance(model_or_shapes, FlatModel)
              else list(model_or_shapes))
    d = sum(math.prod(s) for s in shapes)
    if isinstance(layout, ssse_ext.BlockLayout):
        if block_size is not None:
            raise ValueError("give block_size or a BlockLayout as layout, not both")
        if layout.dim != d:
            raise ValueError(f"layout covers dim={layout.dim} parameters, the model has d={d} "
                             "trainable parameters")
        return layout
    if not isinstance(layout, str):
        raise TypeError(f"layout must be one of {LAYOUTS} or a ssse_ext.BlockLayout, got "
                        f"{type(layout).__name__}")
    check_choice(layout, "layout", LAYOUTS)
    if layout == "rows":
        if block_size is not None:
            raise ValueError('layout="rows" fixes the blocks: drop block_size')
        return row_layout(module)
    if layout == "per_parameter":
        return ssse_ext.BlockLayout.per_parameter(shapes, block_size or ssse_ext.DEFAULT_BLOCK_SIZE)
    return ssse_ext.BlockLayout.fixed(d, block_size or max(1, min(d, ssse_ext.DEFAULT_BLOCK_SIZE)))


def row_layout(model: nn.Module) -> ssse_ext.BlockLayout:
    """One block per output row of a linear model, plus one for its bias: the paper's
    multi-attribute layout, where attribute ``i``'s weights form block ``i``."""
    if not isinstance(model, nn.Linear) or not model.weight.requires_grad:
        raise ValueError(f'layout="rows" needs a trainable torch.nn.Linear model, got '
                         f"{type(model).__name__}")
    out_f, in_f = model.weight.shape
    cuts = [in_f * (r + 1) for r in range(out_f)]
    bias = model.bias is not None and model.bias.requires_grad
    return ssse_ext.BlockLayout.from_boundaries(cuts, out_f * in_f + (out_f if bias else 0))


