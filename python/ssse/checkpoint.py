"""The resumable fit: the stable build driven chunk by chunk and checkpointed to a file."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

import ssse_ext

from .batches import batch_len, batch_slice, is_batch
from .curvature import get_curvature
from .faults import crash_point
from .model import FlatModel
from .rows import row_stream

__all__ = ["CHECKPOINT_SECONDS", "fit_resumable", "skip_samples"]


#: Seconds between checkpoints of a resumable fit when ``every`` is not given.
CHECKPOINT_SECONDS = 300.0


def skip_samples(data, count: int, task=None):
    """``data`` without its first ``count`` samples (one batch, or a generator over the
    remaining batches of a re-iterable)."""
    if count == 0:
        return data
    if is_batch(data, task):
        return batch_slice(data, slice(count, None))

    def rest():
        left = count
        for batch in data:
            if left and is_batch(batch, task):
                m = batch_len(batch)
                if m <= left:
                    left -= m
                    continue
                batch, left = batch_slice(batch, slice(left, None)), 0
            yield batch
    return rest()


def fit_resumable(fm: FlatModel, loss_fn, data, lay: ssse_ext.BlockLayout, *, device,
                   chunk_size: int | None, stream_args: dict, settings: dict, path: Path,
                   every: int | None, bar, probe_vectors: int,
                   requests: bool = False) -> ssse_ext.BlockInverseFisher:
    """The stable build driven chunk by chunk, checkpointed to ``path`` (see
    :func:`fit_inverse_fisher`). Chunks are added as they come (no gathering), so that the
    accumulation is the same sequence of kernel calls whatever the checkpoints. ``requests``:
    the blocks held as ``representation="requests"`` holds them."""
    from .io import FileFormatError, fingerprint, load_checkpoint, save_checkpoint

    ident = {"model": fingerprint(fm.model.state_dict()), **settings}
    minibatch = stream_args["minibatch"]
    acc = ssse_ext.GramAccumulator(lay, stream_args["dtype"], device)
    generator = None
    curv = get_curvature(stream_args["curvature"])
    if curv.random:
        generator = torch.Generator(device=fm.device).manual_seed(stream_args["seed"])
    cursor, per_sample, complete = 0, None, False
    if path.exists():
        try:
            tensors, meta = load_checkpoint(path)
            saved = meta["fit"]
            if not isinstance(saved, dict):
                raise KeyError("fit")
        except (FileFormatError, KeyError, TypeError) as exc:
            raise ValueError(f"checkpoint {path} is not a checkpoint of a fit ({exc}); delete "
                             "it or choose another path") from None
        _check_resume(path, ident, saved, meta, chunk_size)
        acc.load_state({k: v.to(device) for k, v in tensors.items() if k.startswith("gram.")},
                       meta["accumulator"])
        if generator is not None:
            generator.set_state(tensors["rng"])
        chunk_size, per_sample = int(meta["chunk_size"]), int(meta["rows_per_sample"])
        cursor, complete = int(meta["cursor"]), bool(meta["complete"])
        bar.update(math.ceil(cursor / minibatch))

    def save(done: bool):
        state, acc_meta = acc.state()
        tensors = {k: v.to("cpu") for k, v in state.items()}
        if generator is not None:
            tensors["rng"] = generator.get_state()
        save_checkpoint(path, tensors, {"fit": ident, "cursor": cursor,
                                        "chunk_size": chunk_size, "rows_per_sample": per_sample,
                                        "accumulator": acc_meta, "complete": done})
        crash_point("fit-checkpoint")

    if not complete:
        info: dict = {}
        stream = row_stream(fm, loss_fn, skip_samples(data, cursor, fm.task), "data",
                              chunk_size=chunk_size, info=info, generator=generator,
                              cut_every=every, cut_start=cursor, **stream_args)
        start = saved_at = cursor
        saved_time = time.monotonic()
        for rows in stream:
            acc.add(rows.to(device))
            chunk_size, per_sample = info["chunk_size"], info["rows_per_sample"]
            cursor = start + info["samples"]
            bar.update(rows.shape[0] // per_sample)
            due = cursor // every > saved_at // every if every is not None else \
                time.monotonic() - saved_time >= CHECKPOINT_SECONDS
            if due:
                save(False)
                saved_at, saved_time = cursor, time.monotonic()
        if acc.rows == 0:
            raise ValueError("data is empty: the Fisher needs at least one sample")
        save(True)
    rows_per_sample = per_sample // curv.normalizer_weight(mc_samples=stream_args["mc_samples"])
    probe = ssse_ext.FisherProbe(lay, columns=probe_vectors, device=device) \
        if probe_vectors else None
    return acc.finish(settings["damping"], max(acc.rows, 1) / rows_per_sample,
                      curvature=stream_args["curvature"], probe=probe, requests=requests)


def _check_resume(path: Path, ident: dict, saved: dict, meta: dict,
                  chunk_size: int | None) -> None:
    """Refuses a checkpoint made by another fit, or with settings that change the result."""
    for key in sorted(set(ident) | set(saved)):
        if key == "samples" and None in (saved.get(key), ident.get(key)):
            continue  # an iterable of batches does not tell its size
        if key == "threads" and key in saved and saved[key] != ident[key]:
            raise ValueError(f"checkpoint {path} was made with {saved.get(key)} threads, "
                             f"this process has {ident.get(key)}: the sums would split "
                             f"otherwise and change the result; resume with "
                             f"torch.set_num_threads({saved.get(key)}) (ssse --threads "
                             f"{saved.get(key)}), or delete it")
        if key == "every" and key in saved and saved[key] != ident[key]:
            raise ValueError(f"checkpoint {path} was made with every={saved.get(key)} "
                             f"(--every), got {ident.get(key)}: the chunks are cut at the "
                             f"checkpoints; resume with the same, or delete it")
        if saved.get(key) != ident.get(key):
            what = "the model's parameters or buffers" if key == "model" else \
                f"{key} ({saved.get(key)!r} there, {ident.get(key)!r} here)"
            raise ValueError(f"checkpoint {path} belongs to another fit: {what} differ; "
                             "delete it or choose another path")
    if chunk_size is not None and chunk_size != meta["chunk_size"]:
        raise ValueError(f"checkpoint {path} was made with chunk_size={meta['chunk_size']}, "
                         f"got {chunk_size}: resuming needs the same chunks")
