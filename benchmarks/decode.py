"""Decode speed of jaxft's generation engine against transformers' `generate` (torch), CPU, fp32, SmolLM2-135M.

    python benchmarks/decode.py            # batch 1 and 16, 64 new tokens, time to first token at 512 prompt tokens
    python benchmarks/decode.py --quick    # a correctness pass in about a minute: small sizes, timings meaningless
    python benchmarks/decode.py --record   # also write the table into benchmarks/RESULTS.md (section "decode")

Both sides decode the same chat prompts greedily, every row to exactly `--new-tokens` tokens (no EOS stop). Decode
tokens/s = rows x (new tokens - 1) / (time to generate all - time to generate the first token), so prefill is not
counted. Each side is timed `--repeats` times (3), alternating, and the best run of each counts, so a busy moment on
a shared machine does not fall on one side alone. Time to first token is the prefill of one `--ttft-len`-token
prompt plus the first token's choice. The greedy tokens are compared between the two (a mismatch is reported: fp32
rounding may flip a near-tie). Multi-adapter batches (16 rows over 8 different random LoRA r16 all-linear adapters
vs the same 16 rows all on one of them, through the same multi-adapter stack and compiled step) are timed too;
`--adapter DIR` times one bound adapter. Run it on an idle machine: it is a timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxft  # noqa: E402
from benchmarks.common import record, torch_smollm  # noqa: E402
from jaxft import peft  # noqa: E402
from jaxft.generate import Engine  # noqa: E402
from jaxft.peft.multi import AdapterStack, bind_stack  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?",
             "Name three prime numbers.", "Explain gravity to a child.", "What is 12 times 7?",
             "Translate 'good morning' into Spanish.", "Give me a tip for learning to code.",
             "Why is the sky blue?", "What does a fine-tuned language model do?", "List four colours.",
             "What is a neural network?", "Describe a cat in one sentence.", "How far is the Moon?",
             "Who wrote Hamlet?", "Suggest a name for a dog."]


def ours_run(config, params, prompts, n, slots, adapter_ids=None):
    """(seconds to the first tokens, seconds for the rest, tokens per row) for one batch on a fresh engine state."""
    eng = Engine(config, params, slots=slots, max_len=1 << (max(map(len, prompts)) + n).bit_length(),
                 multi_adapter=adapter_ids is not None)
    t0 = time.perf_counter()
    first = eng.add_many(prompts, max_new_tokens=[n] * len(prompts), adapter_ids=adapter_ids)
    t1 = time.perf_counter()
    events = eng.step(n)
    t2 = time.perf_counter()
    toks = {e.slot: list(e.tokens) for e in first}
    for e in events:
        toks[e.slot] += e.tokens
    return t1 - t0, t2 - t1, [toks[e.slot] for e in first]


def torch_run(model, tok, prompts, n):
    import torch

    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id or 0, eos_token_id=None)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(**batch, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, **kw)
        t2 = time.perf_counter()
    width = batch["input_ids"].shape[1]
    return t1 - t0, (t2 - t1) - (t1 - t0), out[:, width:].tolist()


def adapter_stack(config, params, count: int, rank: int):
    """A stack of `count` random LoRA adapters (rank `rank`, all linear modules, B non-zero so each changes the
    output)."""
    stack = AdapterStack.create(params, capacity=count, max_rank=rank)
    spec = peft.LoraSpec(r=rank, alpha=2 * rank, target_modules="all-linear")
    for i in range(count):
        adapter = peft.init(spec, config, params, jax.random.key(i))
        adapter = jax.tree_util.tree_map_with_path(
            lambda path, a: 0.01 * jax.random.normal(jax.random.key(i + 100), a.shape, a.dtype)
            if "lora_b" in jax.tree_util.keystr(path) else a, adapter)
        stack.add(f"a{i}", spec, adapter, params)
    return stack


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for correctness only")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--ttft-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side per batch size (the best counts)")
    ap.add_argument("--adapter", default=None, help="a peft adapter bound on our side (LoRA leaves, factored path)")
    ap.add_argument("--record", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.batches, args.ttft_len, args.repeats = 8, "1,2", 64, 1
    batches = [int(b) for b in args.batches.split(",")]

    config, params = jaxft.load_pretrained("smollm2-135m-instruct")
    if args.adapter:
        spec, adapter = peft.load_adapter(args.adapter, config)
        params = peft.bind(params, spec, adapter)
    tok = jaxft.load_tokenizer("smollm2-135m-instruct")
    model = torch_smollm().eval()
    chat = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    n = args.new_tokens
    lines = ["| measure | jaxft | transformers | ratio (> 1: jaxft faster) |", "|---|---|---|---|"]
    for b in batches:
        prompts = [chat[i % len(chat)] for i in range(b)]
        ours_run(config, params, prompts, n, b)  # compile
        torch_run(model, tok, prompts[:1], 2)  # warm
        t_ours = t_torch = float("inf")
        for _ in range(args.repeats):  # alternating, the best of each: a busy moment costs neither side alone
            _, t, toks_ours = ours_run(config, params, prompts, n, b)
            t_ours = min(t_ours, t)
            _, t, toks_torch = torch_run(model, tok, prompts, n)
            t_torch = min(t_torch, t)
        ours_tps, torch_tps = b * (n - 1) / t_ours, b * (n - 1) / t_torch
        lines.append(f"| decode tokens/s, batch {b}, {n} new tokens | {ours_tps:.1f} | {torch_tps:.1f} | "
                     f"{ours_tps / torch_tps:.2f}x |")
        same = sum(a == c for a, c in zip(toks_ours, toks_torch))
        print(f"batch {b}: {same}/{b} rows token-identical to transformers", file=sys.stderr)
    if not args.adapter:
        b, count = batches[-1], 8
        prompts = [chat[i % len(chat)] for i in range(b)]
        stack = adapter_stack(config, params, count, 16)
        bound = bind_stack(params, stack.arrays)
        timed = {}
        for label, ids in (("one", [0] * b), ("mixed", [i % count for i in range(b)])):
            ours_run(config, bound, prompts, n, b, ids)  # compile
            timed[label] = min(ours_run(config, bound, prompts, n, b, ids)[1] for _ in range(2))
        lines.append(f"| {b} rows over {count} LoRA r16 adapters vs {b} rows of one, decode time | "
                     f"{timed['mixed']:.2f} s vs {timed['one']:.2f} s | | {timed['mixed'] / timed['one']:.2f}x "
                     f"(goal <= 1.3x) |")
    long = (chat[0] * (args.ttft_len // len(chat[0]) + 1))[:args.ttft_len]
    ours_run(config, params, [long], 1, 1)  # compile
    t_first_ours = min(ours_run(config, params, [long], 1, 1)[0] for _ in range(3))
    t_first_torch = min(torch_run(model, tok, [long], 1)[0] for _ in range(3))
    lines.append(f"| time to first token, {args.ttft_len}-token prompt, batch 1 | {t_first_ours * 1000:.0f} ms | "
                 f"{t_first_torch * 1000:.0f} ms | {t_first_torch / t_first_ours:.2f}x |")
    print("\n".join(lines))
    if args.record and not args.quick:
        record("decode", lines, "python benchmarks/decode.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
