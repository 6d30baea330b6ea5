r"""What a curvature is to the rest of the library: a source of rows.

The stored inverse holds, per block, :math:`F_b = \lambda I + \frac1N \sum_r u_{r,b} u_{r,b}^\top`.
A :class:`Curvature` says what the rows :math:`u_r` of a batch are and how they are counted
(rows per sample, the normaliser :math:`N`), and what the code that fits, downdates and erases
with them may assume (labels, likelihood, mini-batches, weight decay, the Newton step). The
fit, the requests and the CLI ask these attributes; none of them names a curvature.

:class:`Registry` keeps objects by name; as a sequence it is the tuple of their names, which is
what ``in``, choice checks and ``argparse`` choices read.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch

from ..batches import batch_len

__all__ = ["Curvature", "Registry", "outputs_2d"]


def outputs_2d(fm, params: dict, frozen: dict, x) -> torch.Tensor:
    """The model's outputs :math:`z` as ``(m, c)``, without gradients."""
    with torch.no_grad():
        z = fm(params, x, frozen)
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"this curvature needs the model's outputs as one tensor (or a "
                        f"'logits' entry), got {type(z).__name__}")
    return z.reshape(batch_len(x), -1)


class Curvature(abc.ABC):
    r"""A source of the rows :math:`u_r` of :math:`F = \lambda I + \frac1N\sum_r u_r u_r^\top`.

    Subclass it, set the attributes, implement :meth:`rows` (and :meth:`rows_per_sample` when a
    sample gives other than one row), then :func:`ssse.curvature.register_curvature` an
    instance: ``fit_inverse_fisher(..., curvature=name)``, :class:`ssse.Eraser` and the CLI
    then use it.

    Attributes:
        name: the registered name, recorded in the inverse (``inv.curvature``) and the ledger.
        needs_labels: the rows depend on the labels :math:`y_i` (otherwise a request can be
            served for samples whose labels were not kept).
        needs_likelihood: the rows need the model's output distribution (a
            :class:`~ssse.curvature.likelihoods.Likelihood`, inferred from the loss).
        allows_minibatch: a row may be the mean over a group of ``minibatch > 1`` samples.
        includes_weight_decay: the gradient :math:`w\theta` of the regulariser
            :math:`\frac w2\lVert\theta\rVert^2` enters every row. Otherwise the regulariser's
            curvature :math:`wI` is the damping's part, and ``damping = weight_decay`` makes the
            stored matrix the curvature of the training objective.
        rows_are_gradients: the rows are the per-sample gradients :math:`\nabla\ell_i`, so
            their sum is the removed samples' gradient (no second pass).
        supports_newton: the stored matrix is the Gauss–Newton matrix, which the leave-k-out
            Newton step (:func:`ssse.newton_erase`) downdates exactly with the removed samples'
            rows.
        random: the rows are random draws, made reproducible by ``seed=`` (the generator's
            state is saved in a resumable fit's checkpoints).
        rows_option: the option that sets the rows per sample, named when one sample's rows do
            not fit the memory a chunk may use (``None``: they are computed anyway).
        shardable: a fit may be sharded over processes (``comm=``).
    """

    name: str = ""
    needs_labels: bool = True
    needs_likelihood: bool = False
    allows_minibatch: bool = False
    includes_weight_decay: bool = False
    rows_are_gradients: bool = False
    supports_newton: bool = False
    random: bool = False
    rows_option: str | None = None
    shardable: bool = True

    def layout_for(self, fm, layout):
        """The :class:`ssse_ext.BlockLayout` the inverse is fitted on, from the one asked for
        over ``fm``'s parameters (default: that one); a curvature whose blocks must cover whole
        tensors cuts it again."""
        return layout

    def representation_for(self, fm, layout, representation):
        """The ``representation=`` the build gets for ``layout``, from the one asked for
        (default: that one); a curvature whose blocks need their own store pins them
        (:class:`ssse_ext.blocks.Pinned`)."""
        return representation

    def rows_per_sample(self, num_outputs: int | None, *, mc_samples: int = 1) -> int | None:
        """Rows each sample (or group of ``minibatch`` samples) gives, for a model with
        ``num_outputs`` outputs; ``None`` when it depends on the outputs and they are not known
        (``num_outputs=None``). Default: one."""
        return 1

    def normalizer_weight(self, *, mc_samples: int = 1) -> int:
        r"""How often one sample (or group) counts in the normaliser: :math:`N = n \cdot` this.

        1 when a sample's rows add up to its curvature (one gradient; the ``c`` Gauss–Newton
        rows); the number of rows when each row is one estimate of it (Monte-Carlo draws).
        """
        return 1

    def for_removal(self, *, mc_samples: int = 1) -> tuple["Curvature", float]:
        r"""The curvature and scale :math:`s` whose rows :math:`s\,u_r` a downdate removes to
        take samples back out of the stored matrix: ``(self, 1.0)`` when the rows of the fit
        can be computed again; a random curvature returns the rows of its expectation."""
        return self, 1.0

    @abc.abstractmethod
    def rows(self, fm, params: dict, frozen: dict, x: torch.Tensor, y: torch.Tensor, *,
             loss_fn, likelihood, generator: torch.Generator | None, mc_samples: int,
             minibatch: int, state: dict) -> torch.Tensor:
        r"""The rows of one batch, without the weight-decay term (added by the caller when
        :attr:`includes_weight_decay`).

        Args:
            fm: the model as a function of its flat parameters (:class:`ssse.model.FlatModel`).
            params, frozen: ``{name: tensor}`` trainable parameters to evaluate at, and the
                frozen parameters and buffers.
            x, y: the batch's inputs and labels, ``m`` samples.
            loss_fn: the per-sample loss.
            likelihood: the resolved :class:`~ssse.curvature.likelihoods.Likelihood` when
                :attr:`needs_likelihood`, else ``None``.
            generator: the random stream of a :attr:`random` curvature.
            mc_samples: draws per sample of a Monte-Carlo curvature.
            minibatch: samples per row-group (1 unless :attr:`allows_minibatch`).
            state: a dict kept for the whole stream (e.g. the fallback of a model ``vmap``
                cannot batch).

        Returns:
            ``(m' r, d)`` rows, ``r`` = :meth:`rows_per_sample` per sample (or group), sample
            by sample, detached, in the parameters' dtype; or a :class:`ssse_ext.Rows` of such
            rows and their side payload (:mod:`ssse_ext.side`), for a curvature whose stores
            read one.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Registry(Sequence):
    """Objects of one kind by name. As a sequence: the registered names in registration order,
    compared equal to the tuple of them (what choice checks and ``argparse`` read)."""

    def __init__(self, kind: str, base: type, *, instances_registered: bool = True):
        # instances_registered: an object passed instead of a name must be the registered one
        # (a curvature is recorded by name and looked up again); otherwise any instance of
        # ``base`` goes (a likelihood with its own parameters)
        self.kind, self.base = kind, base
        self.instances_registered = instances_registered
        self._objects: dict[str, object] = {}

    def register(self, obj, *, replace: bool = False):
        """Adds ``obj`` under ``obj.name`` and returns it; a name taken by another object is
        refused unless ``replace``."""
        if isinstance(obj, type):
            raise TypeError(f"register an instance of {obj.__name__}, not the class")
        if not isinstance(obj, self.base):
            raise TypeError(f"a {self.kind} must be a {self.base.__module__}."
                            f"{self.base.__name__}, got {type(obj).__name__}")
        name = obj.name
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a {self.kind}'s name must be an identifier, got {name!r}")
        if name in self._objects and self._objects[name] is not obj and not replace:
            raise ValueError(f"{self.kind} {name!r} is registered already "
                             f"({self._objects[name]!r}); pass replace=True to replace it")
        self._objects[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Removes the object registered as ``name``."""
        if name not in self._objects:
            raise KeyError(f"no {self.kind} {name!r} is registered")
        del self._objects[name]

    def get(self, name_or_obj):
        """The registered object of a name, or an object itself."""
        if isinstance(name_or_obj, self.base):
            if self.instances_registered and \
                    self._objects.get(name_or_obj.name) is not name_or_obj:
                raise ValueError(f"{self.kind} {name_or_obj!r} is not registered: register it "
                                 f"first (it is recorded by name)")
            return name_or_obj
        try:
            return self._objects[name_or_obj]
        except (KeyError, TypeError):
            what = "a registered " if self.instances_registered else "a "
            raise ValueError(f"{self.kind} must be one of {self} or {what}"
                             f"{self.base.__name__}, got {name_or_obj!r}") from None

    def where(self, attribute: str) -> tuple[str, ...]:
        """The names of the objects whose ``attribute`` is true."""
        return tuple(n for n, obj in self._objects.items() if getattr(obj, attribute))

    def __getitem__(self, index):
        return tuple(self._objects)[index]

    def __len__(self) -> int:
        return len(self._objects)

    def __iter__(self):
        return iter(tuple(self._objects))

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._objects

    def __eq__(self, other) -> bool:
        if isinstance(other, (Registry, tuple)):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return repr(tuple(self._objects))
