"""EK-FAC erasure on a GPT-2-small-shaped model: memory and the time per request.

A ``transformers.GPT2LMHeadModel`` is built from its config (random weights, eval mode, no
download) with GPT-2 small's 12 layers at width ``--n-embd``; the inverse covers only the
4 x 12 ``Conv1D`` weights (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``,
selected with ``params=``), one EK-FAC block each (``curvature="ekfac"``, basis-kept refresh;
``--storage compact`` registers and uses an EK-FAC curvature that keeps the bases only in
float32, :func:`ssse.curvature.kfac.ekfac`).
It is fitted on ``--n`` random token sequences of ``--seq-len`` tokens (the next-token loss,
:func:`ssse.causal_lm_loss`), then ``--requests`` requests of ``--k`` sequences are served by
an :class:`ssse.Eraser`. Recorded: the parameters selected and in the model, the inverse's
bytes against the selected weights' bytes, the fit's seconds, and per request the stages of
:attr:`ssse.Eraser.last_timings` with the check split by the store
(:attr:`ssse_ext.blocks.kronecker.KroneckerStore.last_timings`): the downdate of the factor
sums, their re-eigendecomposition and the grid's change.

The memory of the blocks follows from the layer shapes alone (:func:`layer_memory`), so the
same figures are printed for GPT-2 small's width (768) without building it, for both
storages; they are computed, not measured.

    python benchmarks/bench_kfac_scale.py [--n-embd 128] [--n 2000] [--threads 1]
        [--storage exact|compact] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import ssse
from ssse_ext.bench import machine
from ssse.curvature import unregister_curvature
from ssse.curvature.kfac import ekfac
from ssse_ext.blocks.kronecker import CHANGE_STAGES, STORAGE_MODES
from ssse_ext.blocks.kronecker_factors import kronecker_nbytes

#: The Kronecker-factored weights of a GPT-2 block, with their ``(out, in)`` in units of the
#: width (``Conv1D`` stores them ``(in, out)``).
LAYERS = {"attn.c_attn": (3, 1), "attn.c_proj": (1, 1), "mlp.c_fc": (4, 1),
          "mlp.c_proj": (1, 4)}
#: GPT-2 small's configuration.
GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257,
              "n_positions": 1024}
DAMPING = 1e-3
EPSILON = 1.0


def layer_memory(n_layer: int, n_embd: int, dtype: torch.dtype = torch.float32,
                 storage: str = "exact") -> dict:
    """The sizes of the EK-FAC blocks of the ``4 n_layer`` weights of a GPT-2 of width
    ``n_embd``, from their shapes: numbers in the weights, in the eigenbases
    (:math:`out^2 + in^2`) and in the grids (:math:`out\\,in`), and the store's bytes
    (:func:`~ssse_ext.blocks.kronecker_factors.kronecker_nbytes`, vectors in ``dtype``, bases
    kept as ``storage`` says) before any request."""
    if storage not in STORAGE_MODES:
        raise ValueError(f"storage must be one of {STORAGE_MODES}, got {storage!r}")
    weights = bases = grids = nbytes = 0
    for o, i in LAYERS.values():
        out, inn = o * n_embd, i * n_embd
        weights += out * inn
        bases += out * out + inn * inn
        grids += out * inn
        nbytes += kronecker_nbytes(out, inn, dtype, storage=storage)
    size = torch.empty(0, dtype=dtype).element_size()
    return {"weights": n_layer * weights, "eigenbasis_numbers": n_layer * bases,
            "grid_numbers": n_layer * grids, "store_bytes": n_layer * nbytes,
            "weight_bytes": n_layer * weights * size}


def gpt2_parameters(n_layer: int, n_embd: int, vocab_size: int, n_positions: int) -> int:
    """Parameters of a ``GPT2LMHeadModel`` (the output layer tied to the embedding)."""
    per_layer = 12 * n_embd * n_embd + 13 * n_embd
    return vocab_size * n_embd + n_positions * n_embd + n_layer * per_layer + 2 * n_embd


def build(n_layer: int, n_embd: int, n_head: int, vocab_size: int, seq_len: int, seed: int):
    """A random-init GPT-2 in eval mode and the names of its Kronecker-factored weights."""
    import transformers

    torch.manual_seed(seed)
    # eager attention: the fused one has no batching rule for the per-sample gradients
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                  vocab_size=vocab_size, n_positions=seq_len,
                                  bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
                                  attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    names = [f"transformer.h.{j}.{layer}.weight" for j in range(n_layer) for layer in LAYERS]
    return model, names


def sequences(n: int, seq_len: int, vocab_size: int, seed: int) -> dict:
    """``n`` random token sequences as one mapping batch (the labels are the inputs)."""
    ids = torch.randint(0, vocab_size, (n, seq_len),
                        generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def run(*, n_layer: int = 12, n_embd: int = 128, n_head: int = 4, vocab_size: int = 512,
        seq_len: int = 16, n: int = 2000, requests: int = 10, k: int = 4,
        chunk_size: int | None = None, device: str = "cpu", seed: int = 0,
        storage: str = "exact") -> dict:
    """Fits the EK-FAC inverse (its bases kept as ``storage`` says), serves the requests
    (sequences ``0 .. requests k - 1``) and returns the measurements, the model and the
    eraser."""
    if storage not in STORAGE_MODES:
        raise ValueError(f"storage must be one of {STORAGE_MODES}, got {storage!r}")
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head),
                        ("vocab_size", vocab_size), ("seq_len", seq_len), ("n", n),
                        ("requests", requests), ("k", k)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if n_embd % n_head:
        raise ValueError(f"n_embd must be a multiple of n_head ({n_head}), got {n_embd}")
    if requests * k >= n:
        raise ValueError(f"requests * k must be below n ({n}), got {requests * k}")
    model, names = build(n_layer, n_embd, n_head, vocab_size, seq_len, seed)
    model.to(device)
    data = {key: v.to(device) for key, v in sequences(n, seq_len, vocab_size, seed + 1).items()}
    curvature = "ekfac" if storage == "exact" else "ekfac_bench_compact"
    if storage == "compact":
        ekfac(curvature, storage="compact")
    try:
        eraser = ssse.Eraser(model, ssse.causal_lm_loss, curvature=curvature, damping=DAMPING,
                             params=names, chunk_size=chunk_size)
        t = _clock(device)
        eraser.fit(data)
        fit_s = _clock(device) - t
        fitted_bytes = eraser.inv_fisher.nbytes
        stages = _serve(eraser, data, requests, k)
    finally:
        if storage == "compact":
            unregister_curvature(curvature)
    inv = eraser.inv_fisher
    selected = sum(p.numel() for name, p in model.named_parameters() if name in set(names))
    result = {
        "device": str(device), "storage": storage,
        "config": {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
                   "vocab_size": vocab_size, "seq_len": seq_len, "n": n, "requests": requests,
                   "k": k, "damping": DAMPING, "epsilon": EPSILON},
        "selected_parameters": selected,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "inverse_bytes": inv.nbytes, "fitted_bytes": fitted_bytes,
        "selected_bytes": selected * inv.dtype.itemsize,
        "fit_s": fit_s, "requests": stages,
        "rebased": sum(getattr(store, "rebased", 0) for store in inv.stores),
        "shapes": layer_memory(n_layer, n_embd, inv.dtype, storage),
        "gpt2_small": {mode: layer_memory(GPT2_SMALL["n_layer"], GPT2_SMALL["n_embd"],
                                          inv.dtype, mode) for mode in STORAGE_MODES},
    }
    return {"result": result, "model": model, "eraser": eraser, "data": data}


def _serve(eraser, data: dict, requests: int, k: int) -> list[dict]:
    """Serves the requests; per request the seconds of its stages and of the store's."""
    inv = eraser.inv_fisher
    stages = []
    for r in range(requests):
        ids = list(range(r * k, (r + 1) * k))
        eraser.erase({key: v[ids] for key, v in data.items()}, ids=ids, epsilon=EPSILON,
                     inplace=True)
        split: dict[str, float] = dict.fromkeys(CHANGE_STAGES, 0.0)
        for store in inv.stores:
            for stage, s in getattr(store, "last_timings", {}).items():
                split[stage] = split.get(stage, 0.0) + s
        stages.append({**eraser.last_timings, **split})
    return stages


def _clock(device) -> float:
    """Seconds, after the work queued on ``device``."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _median(stages: list[dict], key: str) -> float:
    return statistics.median(s.get(key, 0.0) for s in stages)


def report(result: dict) -> str:
    """The measured table and the computed GPT-2-small figures, as markdown."""
    m, cfg = machine(), result["config"]
    where = f"{m['cpu']}, {m['threads']} threads" if result["device"] == "cpu" else \
        f"{m['cuda']} ({result['device']})"
    sel, model_n = result["selected_parameters"], result["model_parameters"]
    ratio = result["inverse_bytes"] / result["selected_bytes"]
    shapes, storage = result["shapes"], result.get("storage", "exact")
    lines = [f"Measured on {where}, torch {m['torch']}: "
             f"GPT-2, {cfg['n_layer']} layers, width {cfg['n_embd']}, vocabulary "
             f"{cfg['vocab_size']}, {cfg['n']} sequences of {cfg['seq_len']} tokens, "
             f"{cfg['requests']} requests of {cfg['k']}, storage {storage!r}.", "",
             "| measured | value |", "|---|---|",
             f"| parameters: model / selected (4 x {cfg['n_layer']} weights) | "
             f"{model_n:,} / {sel:,} |",
             f"| inverse (EK-FAC, {storage}) bytes: fitted / after the requests | "
             f"{result.get('fitted_bytes', result['inverse_bytes']) / 1e6:.1f} / "
             f"{result['inverse_bytes'] / 1e6:.1f} MB |",
             f"| inverse after the requests / selected weights (float32), bytes | "
             f"{ratio:.1f}x |",
             f"| inverse after the requests / whole model (float32), bytes | "
             f"{result['inverse_bytes'] / (4 * model_n):.2f}x |",
             f"| eigenbases / selected weights, numbers | "
             f"{shapes['eigenbasis_numbers'] / sel:.2f}x |",
             f"| fit | {result['fit_s']:.1f} s |"]
    stages = result["requests"]
    for key, label in (("total", "request, total"), ("rows", "request: rows"),
                       ("apply", "request: apply (step, write of parameters)"),
                       ("check", "request: check (downdate of all blocks)"),
                       ("sums", "  of which: downdate of the factor sums"),
                       ("eigh", "  of which: re-eigendecomposition"),
                       ("grid", "  of which: grid in the kept basis"),
                       ("write", "request: write"), ("probe", "request: probe")):
        lines.append(f"| {label} (median of {len(stages)}) | "
                     f"{_median(stages, key) * 1e3:.0f} ms |")
    lines.append(f"| bases replaced over the requests | {result['rebased']} |")
    full = result["gpt2_small"]["exact"]
    n_full = gpt2_parameters(**{k: GPT2_SMALL[k] for k in ("n_layer", "n_embd", "vocab_size",
                                                             "n_positions")})
    lines += ["", "Computed from the shapes (not run), GPT-2 small (width 768, 12 layers):", "",
              "| computed | value |", "|---|---|",
              f"| parameters: model / selected | {n_full:,} / {full['weights']:,} |",
              f"| eigenbases | {full['eigenbasis_numbers']:,} numbers, "
              f"{full['eigenbasis_numbers'] / full['weights']:.2f}x the selected, "
              f"{full['eigenbasis_numbers'] / n_full:.2f}x the model |",
              f"| grids | {full['grid_numbers']:,} numbers (1x the selected) |"]
    what = {"exact": "float64 bases, eigenvalues, grid; float32 copies of the bases",
            "compact": "float32 bases; float64 eigenvalues, grid"}
    for mode, label in what.items():
        m = result["gpt2_small"][mode]
        lines.append(f"| EK-FAC store, storage {mode!r} ({label}), fitted | "
                     f"{m['store_bytes'] / 1e9:.3f} GB, "
                     f"{m['store_bytes'] / m['weight_bytes']:.2f}x the selected weights' "
                     f"float32 bytes, {m['store_bytes'] / (4 * n_full):.2f}x the model's |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--n", type=int, default=2000, help="training sequences")
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--k", type=int, default=4, help="sequences per request")
    p.add_argument("--chunk-size", type=int, default=64,
                   help="sequences per chunk of the fit (0: as its memory plan says)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; 1 on a shared machine)")
    p.add_argument("--device", default="cpu", help="of the model and the inverse")
    p.add_argument("--storage", default="exact", choices=STORAGE_MODES,
                   help="how the EK-FAC blocks keep their bases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = run(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
              vocab_size=args.vocab_size, seq_len=args.seq_len, n=args.n,
              requests=args.requests, k=args.k, chunk_size=args.chunk_size or None,
              device=args.device, seed=args.seed, storage=args.storage)
    result = out["result"]
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "machine": machine()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
