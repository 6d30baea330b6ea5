"""The first stage of every experiment: a task (a data set with its model, loss, L2
coefficient and training recipe), built for a data set or rebuilt from a model file."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ssse import retrain, training
from ssse.data import Dataset, load_dataset, load_recorded
from ssse.models import LOSS_LIKELIHOODS, build_model, loss_function

__all__ = ["DEFAULTS", "MODELS", "Task", "make_task", "task_from_metadata"]

#: The models :func:`make_task` builds: the convex (linear) model, the small ResNet and the
#: CIFAR ResNet-20 of paper §5.3.
MODELS = ("linear", "resnet", "resnet20")

#: Per data set: the L2 coefficient of the convex model and the Fisher damping of the demo.
DEFAULTS = {
    "digits": {"weight_decay": 1e-3, "damping": 1e-3},
    "fashion-mnist": {"weight_decay": 1e-3, "damping": 1e-3},
    "yeast": {"weight_decay": 1e-3, "damping": 1e-3},
}
_RESNET = {"epochs": 4, "lr": 0.05, "batch_size": 64, "momentum": 0.9, "weight_decay": 5e-4}


@dataclass
class Task:
    """A data set with the model, loss, L2 coefficient and training recipe used on it.

    ``recipe`` is plain JSON (it travels in model files): ``{"optimizer": "lbfgs", "max_iter"}``
    for the convex models, ``{"optimizer": "sgd", "epochs", "lr", "batch_size", "momentum"}``
    for the CNN.
    """

    ds: Dataset
    spec: dict
    loss: str
    weight_decay: float
    recipe: dict
    dtype: torch.dtype = torch.float64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data_info: dict = field(default_factory=dict)

    @property
    def loss_fn(self):
        return loss_function(self.loss)

    @property
    def n(self) -> int:
        return self.ds.n_train

    @property
    def likelihood(self) -> str:
        """The output distribution of the task's loss (for the Gauss–Newton curvature)."""
        return LOSS_LIKELIHOODS[self.loss]

    def data(self, idx: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The training samples ``idx`` (all by default) as one ``(x, y)`` batch in a list."""
        x, y = self.ds.train()
        if idx is not None:
            x, y = x[idx], y[idx]
        # A one-batch iterable rather than a bare pair: the library then never re-slices it.
        return [(x.to(self.device, self.dtype), y.to(self.device))]

    def retained(self, removed: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The training samples not in ``removed``, as :meth:`data`."""
        keep = torch.ones(self.n, dtype=torch.bool)
        keep[removed] = False
        return self.data(torch.nonzero(keep).flatten())

    def new_model(self) -> nn.Module:
        return build_model(self.spec).to(device=self.device, dtype=self.dtype)

    def make_recipe(self, progress: bool = False):
        """The training recipe; ``progress`` shows a bar over the SGD steps (L-BFGS has none)."""
        r = dict(self.recipe)
        kind = r.pop("optimizer")
        if kind == "sgd":
            r["progress"] = progress
        factory = {"lbfgs": training.lbfgs_recipe, "sgd": training.sgd_recipe}[kind]
        return factory(self.new_model, self.loss_fn, weight_decay=self.weight_decay,
                       device=self.device, dtype=self.dtype, **r)

    def train(self, data, *, seed: int, progress: bool = False) -> nn.Module:
        """A model trained from scratch on ``data`` with this task's recipe (eval mode)."""
        return retrain(self.make_recipe(progress), data, seed=seed).eval()

    def metadata(self, **extra) -> dict:
        """What a model file needs to rebuild, retrain and erase from this model."""
        return {"loss": self.loss, "weight_decay": self.weight_decay, "recipe": self.recipe,
                "data": self.data_info, "n_train": self.n, **extra}


def make_task(data: str = "digits", *, model: str = "linear", data_dir=None, seed: int = 0,
              train_limit: int | None = None, test_limit: int | None = None, device=None,
              dtype: torch.dtype | None = None, weight_decay: float | None = None,
              epochs: int | None = None, bias: bool | None = None, width: int = 8,
              pool: int = 1) -> Task:
    """The task of data set ``data`` with a linear model (L-BFGS to the optimum, float64), the
    small ResNet (``"resnet"``: SGD, float32; ``width`` channels) or the CIFAR ResNet-20
    (``"resnet20"``), the input average-pooled by ``pool``."""
    device = torch.device(device or "cpu")
    if model == "linear":
        dtype = dtype or torch.float64
    else:
        dtype = dtype or torch.float32
    ds = load_dataset(data, data_dir=data_dir, seed=seed, train_limit=train_limit,
                      test_limit=test_limit, dtype=dtype)
    info = {"name": data, "seed": seed, "train_limit": train_limit, "test_limit": test_limit,
            "data_dir": str(data_dir) if data_dir is not None else None}
    loss = "bce" if ds.task == "multilabel" else "cross_entropy"
    if model == "linear":
        if bias is None:
            bias = ds.task != "multilabel"  # the paper's multi-attribute model has no bias
        spec = {"arch": "linear", "in_features": ds.num_features, "out_features": ds.num_classes,
                "bias": bool(bias)}
        wd = DEFAULTS.get(data, {}).get("weight_decay", 1e-3) if weight_decay is None \
            else weight_decay
        recipe = {"optimizer": "lbfgs", "max_iter": 500, "tolerance": 1e-9}
    elif model in MODELS:
        if ds.image_shape is None:
            raise ValueError(f"the {model} model needs an image data set, not {data}")
        if ds.task != "multiclass":
            raise ValueError(f"the {model} model needs a multiclass data set")
        c, h, _ = ds.image_shape
        if model == "resnet":
            spec = {"arch": "small_resnet", "in_channels": c, "num_classes": ds.num_classes,
                    "width": width, "image_size": h}
        else:  # the CIFAR ResNet-20 of paper §5.3, widths 16/32/64
            spec = {"arch": "resnet", "depth": 20, "in_channels": c,
                    "num_classes": ds.num_classes, "width": 16, "image_size": h}
        if pool != 1:
            spec["pool"] = int(pool)
        wd = _RESNET["weight_decay"] if weight_decay is None else weight_decay
        recipe = {"optimizer": "sgd", "epochs": epochs or _RESNET["epochs"], "lr": _RESNET["lr"],
                  "batch_size": _RESNET["batch_size"], "momentum": _RESNET["momentum"]}
    else:
        raise ValueError(f"unknown model {model!r} (expected one of {', '.join(MODELS)})")
    return Task(ds, spec, loss, float(wd), recipe, dtype, device, info)


def task_from_metadata(meta: dict, data: dict, *, dtype: torch.dtype, device) -> Task:
    """The task a model file was trained on (``data`` may override the recorded data set; the
    caller checks that the training set has the recorded ``n_train`` samples)."""
    return Task(load_recorded(data, dtype=dtype), meta["spec"], meta.get("loss", "cross_entropy"),
                float(meta.get("weight_decay", 0.0)),
                meta.get("recipe", {"optimizer": "lbfgs"}), dtype, torch.device(device or "cpu"),
                data)
