"""The task of each data set (model, loss, L2 coefficient, training recipe), and the inverse
of :meth:`Task.metadata` used to rebuild a task from a model file."""

from __future__ import annotations

import torch
from torch import nn

import ssse_ext
from ssse.data import load_dataset

from .common import Task

__all__ = ["DEFAULTS", "make_task", "row_layout", "task_from_metadata"]

#: Per data set: the L2 coefficient of the convex model and the Fisher damping of the demo.
DEFAULTS = {
    "digits": {"weight_decay": 1e-3, "damping": 1e-3},
    "fashion-mnist": {"weight_decay": 1e-3, "damping": 1e-3},
    "yeast": {"weight_decay": 1e-3, "damping": 1e-3},
}
_RESNET = {"epochs": 4, "lr": 0.05, "batch_size": 64, "momentum": 0.9, "weight_decay": 5e-4}


def row_layout(model: nn.Module) -> ssse_ext.BlockLayout:
    """One block per output row of a linear model (plus one for its bias): the paper's
    multi-attribute layout, where attribute ``i``'s parameters form block ``i``."""
    if not isinstance(model, nn.Linear):
        raise ValueError("the rows layout needs a linear model")
    out_f, in_f = model.weight.shape
    cuts = [in_f * (r + 1) for r in range(out_f)]
    dim = out_f * in_f + (out_f if model.bias is not None else 0)
    return ssse_ext.BlockLayout.from_boundaries(cuts, dim)


def make_task(data: str = "digits", *, model: str = "linear", data_dir=None, seed: int = 0,
              train_limit: int | None = None, test_limit: int | None = None, device=None,
              dtype: torch.dtype | None = None, weight_decay: float | None = None,
              epochs: int | None = None, bias: bool | None = None, width: int = 8,
              pool: int = 1) -> Task:
    """The task of data set ``data`` with a linear model (L-BFGS to the optimum, float64) or
    the small ResNet (SGD, float32; ``width`` channels, input average-pooled by ``pool``)."""
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
    elif model == "resnet":
        if ds.image_shape is None:
            raise ValueError(f"the resnet model needs an image data set, not {data}")
        if ds.task != "multiclass":
            raise ValueError("the resnet model needs a multiclass data set")
        c, h, _ = ds.image_shape
        spec = {"arch": "small_resnet", "in_channels": c, "num_classes": ds.num_classes,
                "width": width, "image_size": h}
        if pool != 1:
            spec["pool"] = int(pool)
        wd = _RESNET["weight_decay"] if weight_decay is None else weight_decay
        recipe = {"optimizer": "sgd", "epochs": epochs or _RESNET["epochs"], "lr": _RESNET["lr"],
                  "batch_size": _RESNET["batch_size"], "momentum": _RESNET["momentum"]}
    else:
        raise ValueError(f"unknown model {model!r} (expected linear or resnet)")
    return Task(ds, spec, loss, float(wd), recipe, dtype, device, info)


def task_from_metadata(meta: dict, data: dict, *, dtype: torch.dtype, device) -> Task:
    """The task a model file was trained on (``data`` may override the recorded data set; the
    caller checks that the training set has the recorded ``n_train`` samples)."""
    if "name" not in data:
        raise ValueError("the model file records no data set: pass --data")
    ds = load_dataset(data["name"], data_dir=data.get("data_dir"), seed=int(data.get("seed", 0)),
                      train_limit=data.get("train_limit"), test_limit=data.get("test_limit"),
                      dtype=dtype)
    return Task(ds, meta["spec"], meta.get("loss", "cross_entropy"),
                float(meta.get("weight_decay", 0.0)),
                meta.get("recipe", {"optimizer": "lbfgs"}), dtype, torch.device(device or "cpu"),
                data)
