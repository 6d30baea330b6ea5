r"""The model's output distribution :math:`p(y\,|\,z)`, for the curvatures that need one.

For the outputs :math:`z_i \in \mathbb{R}^c` of sample :math:`i` a :class:`Likelihood` gives

- its negative log-likelihood :math:`-\log p(y_i\,|\,z_i)`, per sample, against which a loss is
  checked (:func:`resolve_likelihood`);
- a factor :math:`B_i \in \mathbb{R}^{c\times c}` of the Hessian of that loss in :math:`z`,
  :math:`B_i B_i^\top = \Lambda_i = \nabla_z^2 (-\log p)`, so that sample :math:`i`'s
  Gauss–Newton matrix :math:`J_i^\top \Lambda_i J_i` is :math:`\sum_r u_{i,r} u_{i,r}^\top` with
  the rows :math:`u_{i,r} = J_i^\top B_i e_r`;
- draws :math:`\hat y \sim p(y\,|\,z_i)` for the Monte-Carlo Fisher.

The registered ones:

- :class:`Categorical` (softmax, ``nn.CrossEntropyLoss``): :math:`p = \mathrm{softmax}\,z`,
  :math:`\Lambda = \mathrm{diag}\,p - pp^\top`, :math:`B e_r = \sqrt{p_r}\,(e_r - p)`;
- :class:`Bernoulli` (independent sigmoids, ``nn.BCEWithLogitsLoss`` summed per sample):
  :math:`p = \sigma(z)`, :math:`\Lambda = \mathrm{diag}\,p(1-p)`,
  :math:`B = \mathrm{diag}\sqrt{p(1-p)}`;
- :class:`Gaussian` with scale :math:`c` (the loss :math:`c\lVert z-y\rVert^2`, ``nn.MSELoss``:
  :math:`c = 1`): :math:`\Lambda = 2c\,I`, :math:`B = \sqrt{2c}\,I`.

The likelihood is never guessed: ``likelihood=None`` infers it from the loss
(:func:`resolve_likelihood`), and a given one is checked against the loss.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..model import per_sample_losses
from .base import Registry

__all__ = ["Bernoulli", "Categorical", "Comparison", "Gaussian", "LIKELIHOODS", "Likelihood",
           "check_likelihood", "get_likelihood", "likelihood_of_loss", "register_likelihood",
           "resolve_likelihood"]

#: Samples of the first batch on which a loss is compared with the likelihoods.
PROBE_SAMPLES = 64


class LabelError(ValueError):
    """The labels cannot be labels of a likelihood (so the loss is not its NLL)."""


@dataclass(frozen=True)
class Comparison:
    """A loss compared with a likelihood's NLL on one batch.

    Attributes:
        agrees: ``True`` (equal to rounding), ``False`` (they differ) or ``None`` (the batch
            cannot tell, e.g. too few samples to fit a free constant and scale).
        likelihood: the likelihood with its free parameters fitted to the loss, or ``None``
            when they could not be.
        detail: what was compared, for messages.
    """

    agrees: bool | None
    likelihood: "Likelihood | None"
    detail: str


def _rtol(loss: torch.Tensor) -> float:
    # the loss and the NLL compute one function by different float operations in the loss's
    # dtype: they differ by a few units of its rounding times the terms' size, far below the
    # square root of its epsilon (1.5e-8 in float64, 3.5e-4 in float32); a real difference
    # (another loss, a weight, label smoothing) is of the order of the loss itself
    dtype = loss.dtype if loss.is_floating_point() else torch.float32
    return math.sqrt(torch.finfo(dtype).eps)


def _agreement(loss: torch.Tensor, nll: torch.Tensor, rtol: float,
               constant: bool) -> tuple[bool | None, str]:
    diff = loss - nll
    if constant:
        if diff.numel() < 2:
            return None, "one sample cannot tell an additive constant"
        diff = diff - diff.mean()
    err = diff.abs()
    ok = bool((err <= rtol * (1 + loss.abs() + nll.abs())).all())
    what = "loss - nll - const" if constant else "loss - nll"
    return ok, f"max |{what}| = {float(err.max()):.3g}"


class Likelihood(abc.ABC):
    r"""An output distribution :math:`p(y\,|\,z)` of a model with outputs ``(m, c)``.

    Attributes:
        name: the registered name (``likelihood="name"``).
        has_constant: the negative log-likelihood carries an additive constant (a log
            normaliser) that a loss may leave out.
    """

    name: str = ""
    has_constant: bool = False

    @property
    def spec(self) -> str:
        """What identifies this likelihood with its parameters (recorded in checkpoints)."""
        return self.name

    def of_loss(self, loss_fn) -> "Likelihood | None":
        """This likelihood (with its parameters) when ``loss_fn`` is the torch loss that is its
        per-sample negative log-likelihood, else ``None``."""
        return None

    def check_outputs(self, z: torch.Tensor) -> None:
        """Refuses outputs ``(m, c)`` this likelihood does not apply to."""

    @abc.abstractmethod
    def nll(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""``(m,)`` :math:`-\log p(y_i\,|\,z_i)` (without its constant) in float64; raises
        :class:`LabelError` for labels this distribution cannot have."""

    @abc.abstractmethod
    def factor(self, z: torch.Tensor) -> torch.Tensor:
        r"""``(m, c, c)`` :math:`B_i` with :math:`B_i B_i^\top = \Lambda_i`."""

    def factor_rows(self, z: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
        r"""``(m, c, d)`` rows :math:`u_{i,r} = J_i^\top B_i e_r` from the output Jacobians
        ``J`` ``(m, c, d)``."""
        return torch.einsum("mcr,mcd->mrd", self.factor(z).to(J.dtype), J)

    @abc.abstractmethod
    def sample(self, z: torch.Tensor, samples: int, generator: torch.Generator,
               like: torch.Tensor) -> torch.Tensor:
        r"""``samples`` draws :math:`\hat y \sim p(y\,|\,z_i)` per sample, draw-major
        (``samples * m`` labels), shaped and typed like the labels ``like``."""

    def compare(self, loss: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> Comparison:
        """Compares per-sample losses ``loss`` ``(m,)`` at outputs ``z`` ``(m, c)`` and labels
        ``y`` with this likelihood's NLL, up to its constant where it has one."""
        try:
            self.check_outputs(z)
            nll = self.nll(z, y)
        except (LabelError, ValueError) as exc:
            return Comparison(False, self, str(exc))
        agrees, detail = _agreement(loss.double(), nll, _rtol(loss), self.has_constant)
        return Comparison(agrees, self, detail)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash((type(self), self.spec))


class Categorical(Likelihood):
    r"""Softmax over ``(m, c)`` logits: :math:`p = \mathrm{softmax}(z)`,
    :math:`-\log p(y\,|\,z) = -z_y + \log\sum_k e^{z_k}` (``nn.CrossEntropyLoss``). Labels:
    class indices, or class probabilities ``(m, c)`` (:math:`-\sum_k y_k \log p_k`)."""

    name = "categorical"

    def of_loss(self, loss_fn):
        if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.reduction == "none" and \
                loss_fn.weight is None and not loss_fn.label_smoothing:
            return self
        return None

    def check_outputs(self, z):
        if z.shape[1] < 2:
            raise ValueError(f'likelihood="categorical" needs (m, c) logits with c >= 2 '
                             f'classes, the model has {z.shape[1]} output; use '
                             f'likelihood="bernoulli"')

    def nll(self, z, y):
        logp = torch.log_softmax(z.double(), dim=1)
        m, c = z.shape
        if not y.is_floating_point() and not y.is_complex() and y.numel() == m:
            idx = y.reshape(m).long()
            if bool(((idx < 0) | (idx >= c)).any()):
                raise LabelError(f"class indices outside 0..{c - 1}")
            return -logp.gather(1, idx[:, None])[:, 0]
        if y.is_floating_point() and y.numel() == m * c:
            q = y.reshape(m, c).double()
            if bool((q < 0).any()) or bool(((q.sum(1) - 1).abs() > 1e-6).any()):
                raise LabelError("labels of shape (m, c) that are not class probabilities")
            return -(q * logp).sum(1)
        raise LabelError(f"labels {tuple(y.shape)} {y.dtype} are neither class indices (m,) "
                         f"nor class probabilities (m, {c})")

    def factor(self, z):
        p = torch.softmax(z, dim=1)
        s = p.sqrt()
        return torch.diag_embed(s) - p.unsqueeze(2) * s.unsqueeze(1)

    def factor_rows(self, z, J):
        p = torch.softmax(z, dim=1)
        mean = torch.einsum("mc,mcd->md", p, J)
        return p.sqrt().unsqueeze(2) * (J - mean.unsqueeze(1))

    def sample(self, z, samples, generator, like):
        m, c = z.shape
        drawn = torch.multinomial(torch.softmax(z, dim=1).float(), samples, replacement=True,
                                  generator=generator).T.reshape(-1)
        if like.is_floating_point() and like.numel() == m * c:  # class probabilities
            return nn.functional.one_hot(drawn, c).reshape((-1,) + tuple(like.shape[1:])) \
                .to(like.dtype)
        return drawn.reshape((-1,) + tuple(like.shape[1:])).to(like.dtype)


class Bernoulli(Likelihood):
    r"""Independent sigmoid outputs (e.g. one per attribute): :math:`p = \sigma(z)`,
    :math:`-\log p(y\,|\,z) = \sum_a \log(1 + e^{z_a}) - y_a z_a` (``nn.BCEWithLogitsLoss``,
    summed per sample). Labels: ``(m, c)`` in :math:`[0, 1]`."""

    name = "bernoulli"

    def of_loss(self, loss_fn):
        if isinstance(loss_fn, nn.BCEWithLogitsLoss) and loss_fn.reduction == "none" and \
                loss_fn.weight is None and loss_fn.pos_weight is None:
            return self
        return None

    def nll(self, z, y):
        m, c = z.shape
        if y.numel() != m * c:
            raise LabelError(f"labels {tuple(y.shape)} are not one per output ({m}, {c})")
        t = y.reshape(m, c).double()
        if bool(((t < 0) | (t > 1)).any()):
            raise LabelError("labels outside [0, 1]")
        return nn.functional.binary_cross_entropy_with_logits(z.double(), t,
                                                              reduction="none").sum(1)

    def factor(self, z):
        p = torch.sigmoid(z)
        return torch.diag_embed((p * (1 - p)).sqrt())

    def factor_rows(self, z, J):
        p = torch.sigmoid(z)
        return (p * (1 - p)).sqrt().unsqueeze(2) * J

    def sample(self, z, samples, generator, like):
        p = torch.sigmoid(z).unsqueeze(0).expand(samples, -1, -1)
        drawn = torch.bernoulli(p, generator=generator)
        return drawn.reshape((-1,) + tuple(like.shape[1:])).to(like.dtype)


class Gaussian(Likelihood):
    r"""Squared error with scale :math:`c`: the loss :math:`c\,\lVert z - y\rVert^2`, the
    negative log-likelihood of :math:`\mathcal N(z, \sigma^2 I)` with :math:`c = 1/(2\sigma^2)`
    up to its constant (``nn.MSELoss``, summed per sample: :math:`c = 1`). Its Gauss–Newton
    factor is :math:`\Lambda = 2c\,I`.

    Args:
        scale: :math:`c > 0`; ``None`` (the registered ``"gaussian"``): fitted to the loss,
            with the constant, when the likelihood is resolved.
    """

    name = "gaussian"
    has_constant = True

    def __init__(self, scale: float | None = None):
        if scale is not None:
            scale = float(scale)
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = scale

    @property
    def spec(self) -> str:
        return self.name if self.scale is None else f"{self.name}(scale={self.scale!r})"

    def of_loss(self, loss_fn):
        if isinstance(loss_fn, nn.MSELoss) and loss_fn.reduction == "none":
            return Gaussian(1.0)
        return None

    def _c(self) -> float:
        if self.scale is None:
            raise ValueError('likelihood="gaussian" has no scale yet: resolve it against the '
                             'loss, or pass likelihood=Gaussian(scale=c)')
        return self.scale

    def _squares(self, z, y) -> torch.Tensor:
        m, c = z.shape
        if y.numel() != m * c or not y.is_floating_point():
            raise LabelError(f"labels {tuple(y.shape)} {y.dtype} are not real targets, one per "
                             f"output ({m}, {c})")
        return ((z.double() - y.reshape(m, c).double()) ** 2).sum(1)

    def nll(self, z, y):
        return self._c() * self._squares(z, y)

    def factor(self, z):
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        return math.sqrt(2 * self._c()) * eye.expand(z.shape[0], -1, -1)

    def factor_rows(self, z, J):
        return math.sqrt(2 * self._c()) * J

    def sample(self, z, samples, generator, like):
        sigma = math.sqrt(1 / (2 * self._c()))
        noise = torch.randn((samples,) + tuple(z.shape), generator=generator, dtype=z.dtype,
                            device=z.device)
        drawn = z.unsqueeze(0) + sigma * noise
        return drawn.reshape((-1,) + tuple(like.shape[1:])).to(like.dtype)

    def compare(self, loss, z, y):
        if self.scale is not None:
            return super().compare(loss, z, y)
        try:
            r = self._squares(z, y)
        except LabelError as exc:
            return Comparison(False, self, str(exc))
        loss64, rtol = loss.double(), _rtol(loss)
        # the loss c r + a has two unknowns: three samples of distinct r at least, or any loss
        # of r would fit
        if r.numel() < 3 or float(r.max() - r.min()) <= rtol * float(r.abs().max()):
            return Comparison(None, None, f"{r.numel()} samples cannot tell a scale and a "
                                          "constant")
        A = torch.stack([r, torch.ones_like(r)], dim=1)
        c, a = torch.linalg.lstsq(A, loss64[:, None]).solution[:, 0].tolist()
        if not c > 0:
            return Comparison(False, self, f"the squared error's fitted scale is {c:.3g} <= 0")
        agrees, detail = _agreement(loss64, c * r + a, rtol, constant=False)
        return Comparison(agrees, Gaussian(c) if agrees else self, f"{detail} (scale {c:.6g})")

    def __repr__(self) -> str:
        return f"Gaussian(scale={self.scale!r})"


#: The registered likelihoods; as a sequence, their names.
LIKELIHOODS = Registry("likelihood", Likelihood, instances_registered=False)


def register_likelihood(obj: Likelihood, *, replace: bool = False) -> Likelihood:
    """Registers a :class:`Likelihood` instance under its ``name``: ``likelihood="name"``
    then selects it, and inference from a loss compares with it too."""
    return LIKELIHOODS.register(obj, replace=replace)


def get_likelihood(name_or_obj) -> Likelihood:
    """The likelihood of a registered name, or a :class:`Likelihood` itself."""
    return LIKELIHOODS.get(name_or_obj)


def check_likelihood(value):
    """``None``, a registered name or a :class:`Likelihood`, returned as given."""
    if value is not None:
        get_likelihood(value)
    return value


for _lik in (Categorical(), Bernoulli(), Gaussian()):
    register_likelihood(_lik)


def likelihood_of_loss(loss_fn) -> Likelihood | None:
    """The likelihood whose per-sample negative log-likelihood the torch loss ``loss_fn`` is
    (``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss``, ``nn.MSELoss`` with
    ``reduction="none"`` and no weights), else ``None``."""
    found = [lik for name in LIKELIHOODS
             if (lik := get_likelihood(name).of_loss(loss_fn)) is not None]
    return found[0] if len(found) == 1 else None


def _loss_name(loss_fn) -> str:
    return getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__


def resolve_likelihood(likelihood, loss_fn, output: torch.Tensor,
                       labels: torch.Tensor) -> Likelihood:
    r"""The likelihood whose negative log-likelihood ``loss_fn`` is: inferred when
    ``likelihood`` is ``None``, else checked.

    A torch loss with ``reduction="none"`` and no weights names its likelihood
    (:func:`likelihood_of_loss`). Any other ``loss_fn`` is evaluated on the batch (one loss per
    sample, extra dimensions summed) and compared with every registered likelihood's
    :math:`-\log p(y\,|\,z)`, up to the additive constant where it has one; exactly one must
    agree to rounding, and no other be left undecided. A given likelihood (a name or a
    :class:`Likelihood`) is compared the same way and refused when it differs.

    Args:
        likelihood: ``None``, a registered name or a :class:`Likelihood`.
        loss_fn: the per-sample loss ``loss_fn(output, labels)``.
        output: the model's outputs on a batch (a few dozen samples suffice).
        labels: the batch's labels.

    Returns:
        The :class:`Likelihood`, with its parameters (a :class:`Gaussian`'s scale) set.

    Raises:
        ValueError: naming ``likelihood=``, when it cannot be inferred or does not match.
    """
    by_type = likelihood_of_loss(loss_fn)
    if likelihood is None and by_type is not None:
        return by_type
    m = output.shape[0]
    z = output.detach().reshape(m, -1)
    with torch.no_grad():
        loss = per_sample_losses(loss_fn, output.detach(), labels).detach()
    where = f"on {m} sample{'s' if m != 1 else ''} of the first batch"
    if likelihood is None:
        found = {name: get_likelihood(name).compare(loss, z, labels) for name in LIKELIHOODS}
        agree = [c.likelihood for c in found.values() if c.agrees]
        undecided = [n for n, c in found.items() if c.agrees is None]
        if len(agree) == 1 and not undecided:
            return agree[0]
        if agree or undecided:
            what = (f"agree with {', '.join(lik.spec for lik in agree)}" if agree else "") + \
                (" and " if agree and undecided else "") + \
                (f"cannot rule out {', '.join(undecided)}" if undecided else "")
        else:
            what = "match none of " + "; ".join(f"{n} ({c.detail})" for n, c in found.items())
        raise ValueError(f"cannot infer the likelihood of loss_fn {_loss_name(loss_fn)}: "
                         f"{where} its per-sample losses {what}; pass likelihood= one of "
                         f"{LIKELIHOODS} or a Likelihood")
    lik = get_likelihood(likelihood)
    if isinstance(likelihood, str) and by_type is not None and by_type.name == lik.name:
        lik = by_type  # the torch loss fixes the parameters the name leaves open
    found = lik.compare(loss, z, labels)
    if found.agrees is False:
        raise ValueError(f"likelihood={lik.spec!r} does not match loss_fn "
                         f"{_loss_name(loss_fn)}: {where}, {found.detail}")
    if found.likelihood is None:
        raise ValueError(f"likelihood={lik.spec!r} leaves parameters open that loss_fn "
                         f"{_loss_name(loss_fn)} cannot fix {where} ({found.detail}); pass "
                         f"likelihood={type(lik).__name__}(...) with them")
    return found.likelihood
