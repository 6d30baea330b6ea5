r"""What a batch is, and how data is read batch by batch.

A batch is one of:

* an ``(inputs, targets)`` pair: ``inputs`` a tensor (the model is called as ``model(x)``) or a
  mapping of tensors (called as ``model(**inputs)``), ``targets`` a tensor; the first dimension
  of every tensor is the sample;
* a mapping of tensors, as a Hugging Face tokenizer or a ``datasets``-style
  :class:`~torch.utils.data.DataLoader` yields: the model is called with every key but
  :data:`TARGET_KEY` (``"labels"``), which holds the targets;
* anything a :class:`~ssse.Task` knows how to run and score (its :meth:`~ssse.Task.split`).

``data`` (and ``removed``) is one batch or an iterable of batches (a list, a
``DataLoader``). The loss receives the model's ``logits`` when its output has them (a Hugging
Face ``ModelOutput``), else the output itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Iterable

import torch
from torch import nn

__all__ = ["TARGET_KEY", "Task", "as_batch_list", "batch_cat", "batch_leaves", "batch_len",
           "batch_map", "batch_slice", "batch_to", "check_data", "check_loss", "check_module",
           "check_reiterable", "concat_data", "data_size", "is_batch", "is_pair", "is_task",
           "iter_batches", "logits_of", "rebatch", "run_model", "Split", "split_batch", "task_of"]

#: The key of a mapping batch that holds the targets; the model gets the other keys.
TARGET_KEY = "labels"


class Task:
    """How to run a batch through the model and score it per sample, for data that is neither
    an ``(inputs, targets)`` pair nor a mapping with ``"labels"``. Pass an instance where a
    ``loss_fn`` is asked for.

    Subclass it and implement :meth:`forward` and :meth:`per_sample_loss`. Every tensor in a
    batch must have the sample as its first dimension (the library cuts batches into samples
    and chunks); other values are passed through unchanged.
    """

    def split(self, batch):
        """``(inputs, targets)`` of a batch: what :meth:`forward` and :meth:`per_sample_loss`
        receive. Default: the whole batch for both."""
        return batch, batch

    def forward(self, model, inputs):
        """The model's outputs for ``inputs`` (call ``model`` as you would the module)."""
        raise NotImplementedError

    def per_sample_loss(self, outputs, targets) -> torch.Tensor:
        """One loss per sample, shape ``(m,)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def is_task(obj) -> bool:
    return isinstance(obj, Task)


def task_of(loss_fn):
    """``loss_fn`` when it is a :class:`Task`, else ``None``."""
    return loss_fn if is_task(loss_fn) else None


def check_loss(loss_fn, name: str = "loss_fn"):
    """A callable ``loss_fn(outputs, targets)`` or a :class:`Task`."""
    if is_task(loss_fn):
        return loss_fn
    if not callable(loss_fn):
        raise TypeError(f"{name} must be a callable loss(outputs, targets) or a ssse.Task, got "
                        f"{type(loss_fn).__name__}")
    return loss_fn


def check_module(model, name: str = "model"):
    """An ``nn.Module`` with at least one trainable parameter."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{name} has no trainable parameters (requires_grad=True)")
    return model


# ---- trees of tensors ------------------------------------------------------------------------

def batch_map(fn, x):
    """``fn`` applied to every tensor of ``x`` (a tensor, or a mapping, tuple or list holding
    tensors); other values are kept."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: batch_map(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(batch_map(fn, v) for v in x)
    return x


def batch_leaves(x) -> list[torch.Tensor]:
    """The tensors of ``x`` (a tensor, or a mapping, tuple or list holding tensors)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in batch_leaves(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in batch_leaves(v)]
    return []


def batch_len(x) -> int:
    """The samples in ``x``: the first dimension of its tensors."""
    leaves = batch_leaves(x)
    if not leaves or leaves[0].dim() == 0:
        raise ValueError("a batch must hold tensors whose first dimension is the sample")
    return int(leaves[0].shape[0])


def batch_slice(x, index):
    """The samples ``index`` (a slice, or a tensor of indices) of ``x``."""
    return batch_map(lambda t: t[index], x)


def batch_cat(parts: list):
    """The batches of ``parts`` (all of one form) concatenated sample-wise."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: batch_cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(batch_cat([p[i] for p in parts]) for i in range(len(first)))
    return first


def batch_to(x, device=None, dtype=None):
    """``x`` with every tensor moved to ``device`` and every floating-point one cast to
    ``dtype`` (either ``None``: unchanged); integer tensors keep their dtype."""
    def move(t):
        if device is not None:
            t = t.to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t
    return batch_map(move, x)


def logits_of(output):
    """The ``logits`` of a model's output when it has them (a Hugging Face ``ModelOutput`` or
    a mapping), else the output."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    return output if logits is None else logits


def run_model(model, inputs):
    """``model(inputs)`` for a tensor, ``model(**inputs)`` for a mapping; the ``logits`` of the
    output when it has them (:func:`logits_of`)."""
    if isinstance(inputs, Mapping):
        return logits_of(model(**inputs))
    return logits_of(model(inputs))


# ---- batches and data ------------------------------------------------------------------------

def _is_inputs(x) -> bool:
    return isinstance(x, torch.Tensor) or (
        isinstance(x, Mapping) and bool(x) and
        all(isinstance(v, torch.Tensor) for v in x.values()))


def is_pair(data) -> bool:
    """Whether ``data`` is one ``(inputs, targets)`` pair (rather than an iterable of batches):
    ``inputs`` a tensor or a mapping of tensors, ``targets`` a tensor."""
    return (isinstance(data, (tuple, list)) and len(data) == 2 and _is_inputs(data[0])
            and isinstance(data[1], torch.Tensor))


def _is_mapping_batch(data) -> bool:
    return isinstance(data, Mapping) and bool(data) and \
        all(isinstance(v, torch.Tensor) for v in data.values())


class Split(tuple):
    """A batch already split into ``(inputs, targets)`` (what :func:`iter_batches` yields):
    read again as it is, whatever the task."""

    __slots__ = ()


def is_batch(data, task=None) -> bool:
    """Whether ``data`` is one batch (rather than an iterable of batches). With a
    :class:`Task`, a tensor, mapping or tuple is one batch and a list or other iterable holds
    batches."""
    if isinstance(data, Split):
        return True
    if task is not None:
        return isinstance(data, (torch.Tensor, Mapping, tuple))
    return is_pair(data) or _is_mapping_batch(data)


def split_batch(batch, label: str, task=None):
    """``(inputs, targets)`` of one batch, checked."""
    if isinstance(batch, Split):
        return batch
    if task is not None:
        return task.split(batch)
    if is_pair(batch):
        x, y = batch
    elif _is_mapping_batch(batch):
        if TARGET_KEY not in batch:
            raise ValueError(f"{label} is a mapping without the targets key {TARGET_KEY!r} "
                             f"(keys: {sorted(batch)}); add it, or pass a ssse.Task as "
                             "loss_fn that says how to score the batch")
        x = {k: v for k, v in batch.items() if k != TARGET_KEY}
        y = batch[TARGET_KEY]
        if not x:
            raise ValueError(f"{label} holds only {TARGET_KEY!r}: the model has no inputs")
    else:
        raise TypeError(f"{label} must be an (inputs, targets) pair of tensors or a mapping of "
                        f"tensors with {TARGET_KEY!r}, got {type(batch).__name__}")
    m = int(y.shape[0]) if y.dim() else -1
    for key, t in ((None, x),) if isinstance(x, torch.Tensor) else x.items():
        if t.dim() == 0 or t.shape[0] != m:
            what = "inputs" if key is None else f"inputs[{key!r}]"
            raise ValueError(f"{label}: {what} and the targets must have the same number of "
                             f"rows, got shapes {tuple(t.shape)} and {tuple(y.shape)}")
    return x, y


def check_data(data, name: str, task=None):
    """One batch, or an iterable of batches (checked as they are read)."""
    if is_batch(data, task):
        split_batch(data, name, task)
        return data
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)):
        raise TypeError(f"{name} must be an (inputs, targets) pair, a mapping batch with "
                        f"{TARGET_KEY!r} or an iterable of batches, got a single "
                        f"{type(data).__name__}")
    try:
        iter(data)
    except TypeError:
        raise TypeError(f"{name} must be an (inputs, targets) pair, a mapping batch or an "
                        f"iterable of batches, got {type(data).__name__}") from None
    return data


def check_reiterable(data, name: str, task=None):
    """Data as in :func:`check_data` that can be read more than once: a one-shot iterator (a
    generator, say) is refused, since its second pass would silently see nothing."""
    check_data(data, name, task)
    if not is_batch(data, task) and isinstance(data, Iterator):
        raise TypeError(f"{name} is read more than once: pass one batch or a re-iterable "
                        f"collection of batches (a list, a DataLoader), not a one-shot "
                        f"{type(data).__name__}")
    return data


def as_batch_list(data, task=None) -> list | None:
    """``data`` as a list of batches when it is one batch or a list/tuple of them (``None``
    for another iterable, which may be read once only)."""
    if is_batch(data, task):
        return [data]
    if isinstance(data, (list, tuple)) and all(is_batch(b, task) for b in data):
        return list(data)
    return None


def data_size(data, task=None) -> int | None:
    """The number of samples of one batch or a list of batches; ``None`` for another iterable
    (its size is not known before it is read)."""
    batches = as_batch_list(data, task)
    if batches is None:
        return None
    return sum(batch_len(split_batch(b, "data", task)[1]) for b in batches)


def iter_batches(data, name: str, *, batch_size: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 task=None) -> Iterator[tuple]:
    """``(inputs, targets)`` of each batch of ``data`` (checked), moved to ``device``;
    floating-point tensors are cast to ``dtype``. One batch is cut into batches of
    ``batch_size`` samples (one batch if ``None``); the batches of an iterable are passed
    through as they come."""
    check_data(data, name, task)
    if is_batch(data, task):
        xs, ys = split_batch(data, name, task)
        n = batch_len(ys)
        step = batch_size or max(n, 1)
        source: Iterable = ((batch_slice(xs, slice(i, i + step)),
                             batch_slice(ys, slice(i, i + step))) for i in range(0, n, step))
        whole = True
    else:
        source, whole = data, False
    for k, batch in enumerate(source):
        label = name if whole else f"{name}[{k}]"
        x, y = batch if whole else split_batch(batch, label, task)
        yield Split((batch_to(x, device, dtype), batch_to(y, device, dtype)))


def concat_data(data, name: str, *, device=None, dtype=None, task=None) -> tuple:
    """All of ``data`` as one ``(inputs, targets)`` pair."""
    xs, ys = [], []
    for x, y in iter_batches(data, name, device=device, dtype=dtype, task=task):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError(f"{name} is empty")
    return batch_cat(xs), batch_cat(ys)


def rebatch(batches: Iterable[tuple], size: int):
    """Regroups a stream of ``(inputs, targets)`` batches into batches of exactly ``size``
    samples (the last one may be smaller), carrying leftovers across batch boundaries."""
    xs, ys, held = [], [], 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        held += batch_len(y)
        if held >= size:
            x_all, y_all = batch_cat(xs), batch_cat(ys)
            full = (held // size) * size
            for i in range(0, full, size):
                yield Split((batch_slice(x_all, slice(i, i + size)),
                             batch_slice(y_all, slice(i, i + size))))
            xs = [batch_slice(x_all, slice(full, None))]
            ys, held = [batch_slice(y_all, slice(full, None))], held - full
    if held:
        yield Split((batch_cat(xs), batch_cat(ys)))
