"""Erase training samples from a LoRA adapter of a BERT-style text classifier.

A small BERT-style model (random initial weights, built from a config: nothing is downloaded)
gets a LoRA adapter fine-tuned on an offline text task: a sentence of random filler words is
positive when it holds more "good" words than "bad" ones. Then 1 % of the training set is
erased with :class:`ssse.Eraser` on the adapter's parameters, and the result is compared with
the adapter retrained from the same initialisation without those samples.

Needs the hf extra (``pip install 'ssse[hf]'``). Runs in about a minute on 2 CPU cores:

    python examples/lora_text_classifier.py [--seed 0] [--n-train 1000] [--erase 0.01]
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import ssse
from ssse.metrics import normalized_confusion_distance, normalized_parameter_distance

VOCAB, GOOD, BAD, PAD = 300, range(10, 20), range(20, 30), 0


def sentences(n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` padded sentences of 6-23 tokens and their labels (1: more good words than bad,
    ties broken by one more word of either kind)."""
    g = torch.Generator().manual_seed(seed)
    length = torch.randint(6, 24, (n,), generator=g)
    ids = torch.randint(30, VOCAB, (n, 24), generator=g)
    good = torch.randint(0, 4, (n,), generator=g)
    bad = torch.randint(0, 4, (n,), generator=g)
    bad = torch.where(good == bad, bad + torch.randint(0, 2, (n,), generator=g) * 2 - 1, bad)
    bad = bad.clamp(0, 4)
    good = torch.where(good == bad, good + 1, good)
    for i in range(n):
        slots = torch.randperm(int(length[i]), generator=g)[:int(good[i] + bad[i])]
        words = [GOOD[j % 10] for j in range(int(good[i]))] + \
                [BAD[j % 10] for j in range(int(bad[i]))]
        for slot, word in zip(slots.tolist(), words):
            ids[i, slot] = word
    mask = (torch.arange(24) < length[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask,
            "labels": (good > bad).long()}


def adapter_model(seed: int) -> torch.nn.Module:
    """The frozen base model (always the same weights) with a LoRA adapter and a trainable
    classifier head initialised from ``seed``."""
    torch.manual_seed(1234)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=32,
                     num_labels=2, attn_implementation="eager")
    base = BertForSequenceClassification(cfg)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="SEQ_CLS",
                        target_modules=["query", "value", "dense"])
    return get_peft_model(base, config)


def loss_fn(logits, labels):
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def fine_tune(data: dict, seed: int, epochs: int = 8) -> torch.nn.Module:
    """AdamW on the adapter and the head, shuffling seeded by ``seed``; eval mode after."""
    model = adapter_model(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    n = data["labels"].shape[0]
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(32):
            batch = {k: v[idx] for k, v in data.items()}
            opt.zero_grad(set_to_none=True)
            loss_fn(model(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                    batch["labels"]).mean().backward()
            opt.step()
    return model.eval()


def predictions(model, data) -> torch.Tensor:
    return ssse.metrics.predict(model, data).argmax(1)


def rows_rate(model, data) -> tuple[float, float]:
    """Seconds for the per-sample gradient rows of ``data``, and for one plain batched forward
    and backward pass of the same samples."""
    t = time.perf_counter()
    for _ in ssse.per_sample_grads(model, loss_fn, data):
        pass
    rows = time.perf_counter() - t
    t = time.perf_counter()
    inputs = {k: v for k, v in data.items() if k != "labels"}
    loss_fn(model(**inputs).logits, data["labels"]).sum().backward()
    plain = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return rows, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--erase", type=float, default=0.01, help="share of D to erase")
    parser.add_argument("--noise", type=float, default=0.1,
                        help="share of training labels flipped (what a model memorises)")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--epsilon", type=float, default=None,
                        help="default: estimated without retraining (ssse.metrics."
                             "estimate_epsilon)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    train, test = sentences(args.n_train, args.seed), sentences(500, args.seed + 1)
    flip = torch.rand(args.n_train, generator=torch.Generator().manual_seed(args.seed + 3))
    train["labels"] = torch.where(flip < args.noise, 1 - train["labels"], train["labels"])
    k = max(1, round(args.erase * args.n_train))
    removed_idx = torch.randperm(args.n_train, generator=torch.Generator().manual_seed(
        args.seed + 2))[:k]
    keep = torch.ones(args.n_train, dtype=torch.bool)
    keep[removed_idx] = False
    S = {key: v[removed_idx] for key, v in train.items()}
    rest = {key: v[keep] for key, v in train.items()}

    t = time.perf_counter()
    model = fine_tune(train, args.seed)
    t_train = time.perf_counter() - t
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    pred_orig_S, pred_orig_T = predictions(model, S), predictions(model, test)

    t = time.perf_counter()
    retrained = fine_tune(rest, args.seed)
    t_retrain = time.perf_counter() - t

    t = time.perf_counter()
    eraser = ssse.Eraser(model, loss_fn, damping=args.damping).fit(train)
    t_fit = time.perf_counter() - t
    epsilon, t = args.epsilon, time.perf_counter()
    if epsilon is None:  # Hessian-vector products: the eager attention has forward-mode AD
        epsilon = ssse.metrics.estimate_epsilon(model, loss_fn, train, probes=8,
                                                inv_fisher=eraser.inv_fisher)
    t_eps, t = time.perf_counter() - t, time.perf_counter()
    eraser.erase(S, ids=removed_idx.tolist(), epsilon=epsilon, inplace=True)
    t_erase = time.perf_counter() - t
    pred_hat_S, pred_retr_S = predictions(model, S), predictions(retrained, S)
    loss_S = {name: float(loss_fn(ssse.metrics.predict(m, S), S["labels"]).mean())
              for name, m in (("erased", model), ("retrained", retrained))}

    labels_S = S["labels"]
    delta = normalized_confusion_distance(pred_hat_S, pred_orig_S, pred_retr_S, labels_S, 2)
    adapter = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()  # noqa: E731
                                   if p.requires_grad])
    orig_flat = torch.cat([original[n].reshape(-1) for n, p in model.named_parameters()
                           if p.requires_grad])
    dist = normalized_parameter_distance(adapter(model), orig_flat, adapter(retrained))

    # the same erasure from rows computed under bfloat16 autocast
    erased_flat = adapter(model)
    erased_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.load_state_dict({**model.state_dict(), **original})
    low = ssse.Eraser(model, loss_fn, damping=args.damping, autocast=torch.bfloat16).fit(train)
    low.erase(S, epsilon=epsilon, inplace=True)
    bf16_diff = float((adapter(model) - erased_flat).norm() / (erased_flat - orig_flat).norm())
    model.load_state_dict({**model.state_dict(), **original})
    rows_s, plain_s = rows_rate(model, train)
    loss_S["original"] = float(loss_fn(ssse.metrics.predict(model, S), S["labels"]).mean())
    model.load_state_dict({**model.state_dict(), **erased_state})

    acc = lambda pred, y: float((pred == y).double().mean())  # noqa: E731
    print(f"task: {args.n_train} training sentences, erase {k} ({args.erase:.0%}); "
          f"adapter d = {eraser.inv_fisher.dim}, {len(eraser.inv_fisher.params)} tensors")
    print(f"accuracy on the test set: original {acc(pred_orig_T, test['labels']):.3f}, "
          f"retrained {acc(predictions(retrained, test), test['labels']):.3f}")
    print(f"accuracy on S: original {acc(pred_orig_S, labels_S):.3f}, erased "
          f"{acc(pred_hat_S, labels_S):.3f}, retrained {acc(pred_retr_S, labels_S):.3f}")
    print(f"mean loss on S: original {loss_S['original']:.3f}, erased {loss_S['erased']:.3f}, "
          f"retrained {loss_S['retrained']:.3f}")
    print(f"delta on S (0: as retrained, 0.5: halfway, 1: as the original): {delta:.3f}; "
          f"adapter distance to retrained / original's: {dist:.3f}")
    print(f"bf16 autocast rows: erased adapter differs from float32 rows' by {bf16_diff:.2e} "
          "of the update")
    print(f"per-sample rows of D: {rows_s:.2f} s, one forward+backward of D: {plain_s:.2f} s "
          f"({rows_s / plain_s:.1f}x)")
    print(f"time: fine-tune {t_train:.1f} s, retrain {t_retrain:.1f} s, fit {t_fit:.1f} s, "
          f"epsilon {epsilon:.3g} ({t_eps:.1f} s), erase {t_erase * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
