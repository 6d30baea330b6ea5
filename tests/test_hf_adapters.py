"""LoRA adapters on Hugging Face models built from configs (random weights, nothing
downloaded): the erasure of a BERT-style classifier's and a GPT-2-style causal LM's adapter
against a float64 reference from per-sample gradients computed one sample at a time."""

import warnings

import pytest
import torch

import ssse

transformers = pytest.importorskip("transformers", reason="needs the hf extra: "
                                   "pip install 'ssse[hf]'")
peft = pytest.importorskip("peft", reason="needs the hf extra: pip install 'ssse[hf]'")

DAMPING = 1e-3
EPS = 0.8
N, T, VOCAB = 24, 9, 50


def randomise_lora_b(model, seed):
    """LoRA initialises B to zero (so A's gradients vanish); a fine-tuned adapter has not."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tokens(seed, *, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    if pad_from is not None:
        mask[::3, pad_from:] = 0
    return ids, mask


def bert_lora(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=3)
    base = transformers.BertForSequenceClassification(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1,
                                                      target_modules=["query", "value"]))
    model = model.double().eval()
    randomise_lora_b(model, seed)
    ids, mask = tokens(seed, pad_from=6)
    labels = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(seed + 1))
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def gpt2_lora(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
                                  n_positions=16)
    base = transformers.GPT2LMHeadModel(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                                      target_modules=["c_attn"],
                                                      fan_in_fan_out=True))
    model = model.double().eval()
    randomise_lora_b(model, seed)
    ids, mask = tokens(seed, pad_from=7)
    labels = ids.masked_fill(mask == 0, ssse.losses.IGNORE_INDEX)
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def classifier_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def reference(model, data, loss_fn, removed, layout):
    """theta + eps/(n-k) F^-1 v, from per-sample gradients one sample at a time."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(N):
        inputs = {k: v[i:i + 1] for k, v in data.items() if k != "labels"}
        loss = loss_fn(model(**inputs).logits, data["labels"][i:i + 1]).sum()
        gs = torch.autograd.grad(loss, [p for _, p in named])
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    G = torch.stack(rows).detach()
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    v = G[removed].sum(0)
    out = theta.clone()
    for start, size in zip(layout.starts, layout.sizes):
        g = G[:, start:start + size]
        F = DAMPING * torch.eye(size, dtype=G.dtype) + g.T @ g / N
        out[start:start + size] += EPS / (N - len(removed)) * torch.linalg.solve(
            F, v[start:start + size])
    return [k for k, _ in named], out


@pytest.mark.parametrize("build,loss_fn", [(bert_lora, classifier_loss),
                                           (gpt2_lora, ssse.causal_lm_loss)],
                         ids=["bert-classifier", "gpt2-causal-lm"])
def test_lora_erasure_matches_the_per_sample_reference(build, loss_fn):
    model, data = build()
    frozen_before = {k: p.detach().clone() for k, p in model.named_parameters()
                     if not p.requires_grad}
    removed = [0, 1, 2, 5]
    sub = {k: v[removed] for k, v in data.items()}
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no per-sample loop, no mode warning
        inv = ssse.fit_inverse_fisher(model, loss_fn, data, damping=DAMPING,
                                      representation="dense", progress=False)
        names, want = reference(model, data, loss_fn, removed, inv.layout)
        assert inv.params == tuple(names) and all("lora_" in k for k in names)
        new = ssse.ssse_update(model, loss_fn, sub, inv_fisher=inv, epsilon=EPS, n_total=N,
                               inplace=True)
    got = torch.cat([new[k].reshape(-1) for k in names])
    # the update (not the parameters) against the reference's update
    rel = float((got - want).norm() / (want - theta).norm())
    assert rel <= 1e-10, rel
    # the frozen base model is bit-identical after the fit and the erasure
    for k, p in model.named_parameters():
        if k in frozen_before:
            assert torch.equal(p.detach(), frozen_before[k]), k


def test_merging_the_erased_adapter_keeps_the_outputs():
    model, data = bert_lora(seed=3)
    sub = {k: v[:3] for k, v in data.items()}
    inv = ssse.fit_inverse_fisher(model, classifier_loss, data, damping=DAMPING, progress=False)
    ssse.ssse_update(model, classifier_loss, sub, inv_fisher=inv, epsilon=EPS, n_total=N,
                     inplace=True)
    inputs = {k: v for k, v in data.items() if k != "labels"}
    with torch.no_grad():
        unmerged = model(**inputs).logits
        merged = model.merge_and_unload()(**inputs).logits
    assert torch.allclose(merged, unmerged, rtol=0, atol=1e-10 * unmerged.abs().max())


def test_an_eraser_serves_adapter_requests_from_a_data_loader():
    model, data = bert_lora(seed=4)
    rows = [{k: v[i] for k, v in data.items()} for i in range(N)]
    loader = torch.utils.data.DataLoader(rows, batch_size=5)  # yields mapping batches
    eraser = ssse.Eraser(model, classifier_loss, damping=DAMPING,
                         representation="dense").fit(loader)
    assert eraser.n == N
    served = eraser.erase({k: v[:2] for k, v in data.items()}, epsilon=EPS, fisher="full")
    inv = ssse.fit_inverse_fisher(model, classifier_loss, data, damping=DAMPING,
                                  representation="dense", progress=False)
    once = ssse.ssse_update(model, classifier_loss, {k: v[:2] for k, v in data.items()},
                            inv_fisher=inv, epsilon=EPS, n_total=N)
    for k in inv.params:
        assert torch.allclose(served[k], once[k], rtol=0, atol=1e-12)
