"""The GPT-2 EK-FAC benchmark (benchmarks/bench_kfac_scale.py) at a tiny size: its memory
figure against the stores' documented sizes, the requests against a fresh fit on the
remaining sequences."""

import pytest
import torch

import ssse

from .testing import load_benchmark

pytest.importorskip("transformers")

TINY = {"n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 32, "seq_len": 8, "n": 40,
        "requests": 3, "k": 2, "chunk_size": 16}


def load_bench():
    return load_benchmark("bench_kfac_scale")


def documented_nbytes(out, inn, storage="exact"):
    """A fitted Kronecker block's bytes as docs/maths.md gives them: float64 eigenvalues and
    grid; float64 bases with float32 copies ("exact") or float32 bases only ("compact")."""
    bases = (8 + 4 if storage == "exact" else 4) * (out * out + inn * inn)
    return bases + 8 * (out + inn + out * inn)


def the_store(inv):
    stores = [s for s in inv.stores if s.name == "ekfac"]
    assert len(stores) == 1 and len(inv.stores) == 1  # only the selected Conv1D weights
    return stores[0]


@pytest.mark.parametrize("storage", ["exact", "compact"])
def test_the_benchmark_measures_what_the_shapes_say_and_erases(one_thread, storage):
    # one thread: a tiny model, where a second thread only adds overhead
    bench = load_bench()
    out = bench.run(**TINY, storage=storage)
    res, model, eraser = out["result"], out["model"], out["eraser"]
    d, L = TINY["n_embd"], TINY["n_layer"]
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]  # (out, in) of the four weights
    assert res["selected_parameters"] == L * sum(o * i for o, i in shapes) == 12 * L * d * d
    assert res["fitted_bytes"] == L * sum(documented_nbytes(o, i, storage) for o, i in shapes)
    assert res["fitted_bytes"] == res["shapes"]["store_bytes"]
    # after the requests, an exact store also holds the float64 sums of its kept bases
    store = the_store(eraser.inv_fisher)
    kept = sum(8 * (b.out ** 2 + b.inn ** 2) for b in store.blocks if b.sums is not None)
    assert res["inverse_bytes"] == res["fitted_bytes"] + kept
    assert kept == 0 or storage == "exact"
    assert all(b.qa.dtype == (torch.float64 if storage == "exact" else torch.float32)
               for b in store.blocks)
    assert res["model_parameters"] == bench.gpt2_parameters(L, d, TINY["vocab_size"],
                                                            TINY["seq_len"])
    assert len(res["requests"]) == TINY["requests"]
    for seconds in res["requests"]:
        assert {"rows", "check", "sums", "eigh", "grid"} <= set(seconds)
        assert seconds["eigh"] > 0 and seconds["sums"] + seconds["eigh"] <= seconds["check"]
    assert "width 768" in bench.report(res)

    # the requests changed the selected weights (written into the model) and nothing else
    fresh_model, names = bench.build(L, d, TINY["n_head"], TINY["vocab_size"],
                                     TINY["seq_len"], 0)
    before = dict(fresh_model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in names), name

    # the factor sums are downdated exactly, and the grid keeps its total (the squared norms
    # of the remaining gradients, the same in every orthonormal basis, also after a rebase)
    removed = TINY["requests"] * TINY["k"]
    data = bench.sequences(TINY["n"], TINY["seq_len"], TINY["vocab_size"], 1)
    kept = {key: v[removed:] for key, v in data.items()}
    ref = ssse.Eraser(fresh_model, ssse.causal_lm_loss, curvature="ekfac",
                      damping=bench.DAMPING, params=names, chunk_size=16).fit(kept)
    got, want = the_store(eraser.inv_fisher), the_store(ref.inv_fisher)
    assert eraser.n == ref.n == TINY["n"] - removed
    # compact: the sums come back from float32 bases (a relative change of a few float32
    # roundings) and a kept basis keeps only their diagonal in it: off by up to the
    # tolerance (1e-2, relative Frobenius norm) per basis kept, so per request at most
    sums_tol = 1e-9 if storage == "exact" else TINY["requests"] * 1e-2
    for blk, fresh in zip(got.blocks, want.blocks):
        for m, m0 in ((blk.a, fresh.a), (blk.g, fresh.g)):
            assert float((m - m0).norm()) <= sums_tol * float(m0.norm())
        assert abs(float(blk.lam.sum() - fresh.lam.sum())) <= 1e-6 * float(fresh.lam.sum())


def test_gpt2_small_memory_from_the_shapes():
    bench = load_bench()
    full = bench.layer_memory(12, 768)
    assert full["weights"] == 12 * 12 * 768 ** 2 == 84_934_656
    # eigenbases: (9 + 1) + (1 + 1) + (16 + 1) + (1 + 16) = 46 d^2 per layer, 46/12 = 3.83x
    assert full["eigenbasis_numbers"] == 12 * 46 * 768 ** 2
    assert bench.gpt2_parameters(12, 768, 50257, 1024) == 124_439_808
    # compact: float32 bases (4 bytes each), float64 grid (8) and eigenvalues (8 * 16 d per
    # layer): within 4x the whole model's float32 bytes
    compact = bench.layer_memory(12, 768, storage="compact")
    assert compact["store_bytes"] == 4 * full["eigenbasis_numbers"] + \
        8 * full["grid_numbers"] + 8 * 12 * 16 * 768
    assert compact["store_bytes"] <= 4 * 4 * 124_439_808
    exact = bench.layer_memory(12, 768, storage="exact")
    assert exact["store_bytes"] == compact["store_bytes"] + 12 * full["eigenbasis_numbers"] - \
        4 * full["eigenbasis_numbers"]
    with pytest.raises(ValueError, match="n_embd"):
        bench.run(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="^storage must be one of"):
        bench.run(storage="small")
