"""The removal stage and the evaluation stage: a removal set with its four splits and its two
reference models (the original and the one retrained without it), and the paper's evaluation
(§4) of any model or ``state_dict`` against them."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ssse import metrics
from ssse.data import four_splits

from .common import timed
from .tasks import Task

__all__ = ["QUANTISED_BELOW", "SPLITS", "Removal", "make_removal", "outputs", "predictions",
           "quantised", "score_name"]

#: The paper's four evaluation splits: D∖S, S, T∖T_a and T_a.
SPLITS = ("D-S", "S", "T-Ta", "Ta")
#: A removal is *quantised* when the original and the retrained model predict differently on
#: fewer than this many samples of S: δ (or γ) then takes a handful of values and decides
#: nothing.
QUANTISED_BELOW = 10
# Rows per forward pass when the evaluation computes a model's outputs.
_EVAL_BATCH = 2048


def outputs(model: nn.Module, data) -> torch.Tensor:
    """The model's outputs (logits) on ``data = (x, y)``, in float64 on the CPU."""
    return metrics.predict(model, data, batch_size=_EVAL_BATCH)


def predictions(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Predicted labels: the argmax class, or one 0/1 column per label (logit > 0)."""
    return (logits > 0) if multilabel else logits.argmax(dim=1)


def quantised(differing: int) -> bool:
    """Whether a removal whose reference models differ on ``differing`` samples of S is
    quantised (see :data:`QUANTISED_BELOW`)."""
    return int(differing) < QUANTISED_BELOW


def score_name(task: Task) -> str:
    """δ for multinomial tasks (lower: closer to retrained), γ for multi-label (higher)."""
    return "gamma" if task.ds.task == "multilabel" else "delta"


@dataclass
class Removal:
    """A removal set ``S`` of ``task``'s training set, its splits and reference models."""

    task: Task
    removed: torch.Tensor
    splits: dict
    original: nn.Module
    retrained: nn.Module
    retrain_seconds: float
    _reference: dict = field(default_factory=dict, repr=False)
    _scratch: nn.Module | None = field(default=None, repr=False)

    @property
    def k(self) -> int:
        return int(self.removed.numel())

    def model_with(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """The original architecture holding ``state`` (one scratch copy, reused)."""
        if self._scratch is None:
            self._scratch = copy.deepcopy(self.original)
        self._scratch.load_state_dict(state)
        return self._scratch.eval()

    def references(self) -> dict:
        """The original's and the retrained model's outputs on S (computed once)."""
        if not self._reference:
            self._reference.update(original=outputs(self.original, self.splits["S"]),
                                   retrained=outputs(self.retrained, self.splits["S"]))
        return self._reference

    def differing(self) -> int:
        """The samples of S on which the original and the retrained model predict differently
        (for multi-label data: any label); below :data:`QUANTISED_BELOW` the removal is
        quantised."""
        ref, multilabel = self.references(), self.task.ds.task == "multilabel"
        a, b = (predictions(ref[m], multilabel) for m in ("original", "retrained"))
        diff = a != b
        return int((diff.any(dim=1) if multilabel else diff).sum())

    def evaluate(self, model: nn.Module | dict, *, params: bool = True) -> dict:
        """Accuracy on the four splits, δ (or γ) on S and, with ``params``, the normalised
        parameter distance (0: the retrained model, 1: the original)."""
        if not isinstance(model, nn.Module):
            model = self.model_with(model)
        out = {name: outputs(model, data) for name, data in self.splits.items()}
        result = {"accuracy": {name: metrics.accuracy(out[name], data[1].cpu())
                               for name, data in self.splits.items()}}
        labels, ref = self.splits["S"][1].cpu(), self.references()
        if self.task.ds.task == "multilabel":
            result["gamma"] = metrics.similarity_ratio(out["S"], ref["original"],
                                                       ref["retrained"], labels)
        else:
            result["delta"] = metrics.normalized_confusion_distance(
                out["S"], ref["original"], ref["retrained"], labels, self.task.ds.num_classes)
        if params:
            result["param_distance"] = metrics.normalized_parameter_distance(
                model, self.original, self.retrained)
        return result


def make_removal(task: Task, model: nn.Module, removed: torch.Tensor, *, classes=None,
                 attribute: int | None = None, seed: int = 0,
                 reference: nn.Module | None = None, progress: bool = False) -> Removal:
    """The removal ``removed`` of ``task``: its four splits, and the model retrained without it
    with the original's seed (or ``reference``, a model already retrained)."""
    splits = four_splits(task.ds, removed, classes=classes, attribute=attribute)
    seconds = float("nan")
    if reference is None:
        reference, seconds = timed(task.train, task.retained(removed), seed=seed,
                                   progress=progress)
    return Removal(task, removed, splits, model, reference.eval(), seconds)
