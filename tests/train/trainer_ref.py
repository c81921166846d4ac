"""The reference side of the trainer parity tests: a plain torch training loop written with transformers (and peft
for LoRA), and the numpy batches both sides train on.

The reference is what a person would write by hand: AdamW from torch (norms and 1-D tensors in a no-decay group),
transformers' `get_cosine_with_min_lr_schedule_with_warmup`, `clip_grad_norm_`, and the loss of a step = the sum of
the shifted token cross-entropies of all its micro-batches over their total number of loss tokens.
"""

from __future__ import annotations

import numpy as np
from optional_import import optional  # torch-free CI leg: tests/conftest.py

torch = optional("torch")


def make_batches(n_steps: int, accum: int, batch: int, seq: int, vocab: int, seed: int = 0,
                 distinct: int = 4) -> list[dict]:
    """`n_steps` dicts (cycling through `distinct` different ones, so that the loss falls) of int32 arrays `[accum, batch, seq]`: input_ids, segment_ids (1 then right padding 0),
    positions, loss_mask (a random prompt part masked out). Rows have different real lengths, so micro-batches of a
    step hold different numbers of loss tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(distinct):
        ids = rng.integers(0, vocab, (accum, batch, seq)).astype(np.int32)
        lengths = rng.integers(seq // 3, seq + 1, (accum, batch))
        prompt = rng.integers(1, seq // 3, (accum, batch))
        t = np.arange(seq)
        seg = (t < lengths[..., None]).astype(np.int32)
        ids = np.where(seg == 1, ids, 0).astype(np.int32)
        loss_mask = ((t >= prompt[..., None]) & (seg == 1)).astype(np.int32)
        pos = np.broadcast_to(t, ids.shape).astype(np.int32) * seg
        out.append({"input_ids": ids, "segment_ids": seg, "positions": pos.astype(np.int32), "loss_mask": loss_mask})
    return [out[i % distinct] for i in range(n_steps)]


def token_loss_sum(model, ids: np.ndarray, seg: np.ndarray, loss_mask: np.ndarray) -> tuple[torch.Tensor, float]:
    """(sum of next-token CE over the counted targets, number of counted targets) of one micro-batch `[B, T]`.
    A pair (t, t+1) counts where loss_mask[t+1] and both tokens are real (segment 1)."""
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    seg_t = torch.as_tensor(seg, dtype=torch.long)
    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    logits = model(input_ids=ids_t, attention_mask=seg_t, position_ids=pos).logits.float()
    w = torch.as_tensor(loss_mask[:, 1:] * (seg[:, 1:] == seg[:, :-1]) * (seg[:, :-1] != 0), dtype=torch.float32)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids_t[:, 1:].reshape(-1),
                                           reduction="none")
    return (ce * w.reshape(-1)).sum(), float(w.sum())


def torch_train(model, batches: list[dict], *, lr: float, warmup: int, total: int, min_lr_ratio: float,
                weight_decay: float, b1: float, b2: float, eps: float, max_grad_norm: float | None) -> dict:
    """Train `model` (in place) on `batches` (see `make_batches`); returns per-step loss, grad_norm, lr lists."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if "norm" in n or n.endswith("bias") or p.ndim <= 1]
    decay = [p for n, p in named if not ("norm" in n or n.endswith("bias") or p.ndim <= 1)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(b1, b2), eps=eps)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_lr_ratio)
    params = [p for _, p in named]
    hist = {"loss": [], "grad_norm": [], "lr": []}
    model.train()
    for b in batches:
        opt.zero_grad()
        total_loss, total_n = 0.0, 0.0
        for a in range(b["input_ids"].shape[0]):
            ls, n = token_loss_sum(model, b["input_ids"][a], b["segment_ids"][a], b["loss_mask"][a])
            total_loss, total_n = total_loss + ls, total_n + n
        loss = total_loss / max(total_n, 1.0)
        loss.backward()
        if max_grad_norm is not None:
            gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            gn = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        hist["lr"].append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        hist["loss"].append(float(loss.detach()))
        hist["grad_norm"].append(float(gn))
    return hist
