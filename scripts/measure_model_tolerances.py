"""Measure the errors behind the numerical tolerances of tests/models, tests/ops and tests/peft (the parts issue 13
audited last: bf16 blocks, remat gradients, KV cache, RoPE, blocked attention, SVD, combine, serve) across seeds
and inputs, using the tests' own helpers. Prints one line per quantity: the largest error over seeds (and, for
injected bugs, the smallest error they cause).

    python scripts/measure_model_tolerances.py [--seeds 5] [--only bf16|model|ops|peft|smollm]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "models"),
                os.path.join(ROOT, "tests", "ops"), os.path.join(ROOT, "tests", "peft")]


def _report(name: str, values: list[float], kind: str = "max") -> None:
    v = max(values) if kind == "max" else min(values)
    print(f"{name}: {kind} {v:.2e} over {len(values)}", flush=True)


def bf16(seeds: int) -> None:
    import test_parity as t

    scale, fro, bugs = [], [], {name: [] for name in t.BF16_BUGS}
    for variant in sorted(t.VARIANTS):
        for seed in range(seeds):
            model, config, params = t.bf16_pair(variant, seed, tempfile.mkdtemp())
            for s, f in t.bf16_block_errors(model, config, params, seed).values():
                scale.append(s)
                fro.append(f)
            for name, path in t.BF16_BUGS.items():
                block = "mlp" if path[0] == "mlp" or "post" in name else "attn"
                errs = t.bf16_block_errors(model, config, params, seed, bug=t.one_percent_on(path))
                bugs[name] += [e[0] for k, e in errs.items() if k.startswith(block)]
        print(f"bf16 {variant} done: scale {max(scale):.2e} fro {max(fro):.2e}", flush=True)
    _report("bf16 blocks |fitted scale - 1|", scale)
    _report("bf16 blocks Frobenius", fro)
    for name, values in bugs.items():
        _report(f"bf16 blocks, 1% on {name}: |fitted scale - 1|", values, "min")


def _pairs(seeds: int):
    """(variant, seed, config, params) of every tiny variant for model seeds 0..seeds-1."""
    import jaxft
    from hf_models import VARIANTS, hf_tiny

    for variant in sorted(VARIANTS):
        for seed in range(seeds):
            d = tempfile.mkdtemp()
            hf_tiny(variant, seed).save_pretrained(d)
            yield variant, seed, *jaxft.load_pretrained(d)


def model(seeds: int) -> None:
    import test_parity as t

    remat, kv, logits16 = [], [], []
    for variant, seed, config, params in _pairs(seeds):
        remat.append(t.remat_gradient_error(config, params, seed=4 + seed))
        kv.append(t.kv_cache_error(config, params, seed=7 + seed))
        logits16.append(t.bf16_logits_error(config, params, seed=5 + seed))
    _report("bf16 logits vs fp32 (end to end)", logits16)
    _report("remat gradients vs no remat (max relative per leaf)", remat)
    _report("KV-cache decoding vs full forward", kv)


def ops(seeds: int) -> None:
    import test_activations as act
    import test_attention as att
    import test_norms as norms
    import test_rope as rope

    _report("rope vs transformers (values, gradients)",
            [rope.rope_error(s, seed) for s in (rope.RopeScaling(), rope.RopeScaling(
                "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64))
             for seed in range(seeds)])
    for dtype in ("float32", "bfloat16"):
        errs = [e for seed in range(seeds) for e in norms.rms_norm_errors(dtype, seed).values()]
        _report(f"rms_norm {dtype} vs transformers (relative to the largest entry)", [e for e, _ in errs])
        _report(f"rms_norm {dtype} vs transformers |fitted scale - 1|", [s for _, s in errs])
    _report("rms_norm bf16, weight 1% too large: |fitted scale - 1| of output and input gradient",
            [norms.rms_norm_errors("bfloat16", seed, bug=1.01)[k][1] for seed in range(seeds)
             for k in ("output", "input gradient")], "min")
    _report("swiglu fp32 vs torch", [act.swiglu_error(seed) for seed in range(seeds)])
    _report("swiglu bf16 vs autodiff (fraction of 2e-2 + 2e-2|ref|)",
            [act.swiglu_bf16_error(seed) for seed in range(seeds)])
    _report("blocked vs plain attention", [att.blocked_vs_plain_error(3 + seed) for seed in range(seeds)])
    sdpa = [att.blocked_vs_sdpa_errors(3 + seed) for seed in range(seeds)]
    _report("blocked attention vs torch sdpa: values", [v for v, _ in sdpa])
    _report("blocked attention vs torch sdpa: gradients", [g for _, g in sdpa])
    _report("blocked attention gradients vs autodiff (padding)",
            [att.blocked_vs_autodiff_error(3 + seed) for seed in range(seeds)])
    _report("model at blocked length vs transformers",
            [att.model_at_blocked_length_error(tempfile.mkdtemp(), seed) for seed in range(seeds)])


def peft(seeds: int) -> None:
    import pathlib

    import jax

    import test_combine as comb
    import test_serve as serve
    import test_svd as svd
    import tiny_tree
    from jaxft import peft as jpeft

    _report("svd full rank (independent, reported)", [e for seed in range(seeds) for e in svd.full_rank_errors(seed)])
    low = [svd.low_rank_errors(rank, seed) for rank in (1, 5, 12) for seed in range(seeds)]
    for key in low[0]:
        _report(f"svd low rank {key}", [e[key] for e in low])
    alpha = [svd.alpha_errors(rs, seed) for rs in (False, True) for seed in range(seeds)]
    for key in alpha[0]:
        _report(f"svd alpha {key}", [e[key] for e in alpha])
    _report("svd signs", [svd.sign_error(seed) for seed in range(seeds)])

    tmp = pathlib.Path(tempfile.mkdtemp())
    out = [serve.to_lora_errors(name, tmp, seed) for name in serve.SPECS for seed in range(seeds)]
    for key in out[0]:
        _report(f"serve to_lora {key}", [e[key] for e in out])

    mags = []
    for seed in range(seeds):
        params = jaxft_init(tiny_tree, seed)
        dora = jpeft.init(jpeft.DoraSpec(r=4, target_modules=("q_proj",)), tiny_tree.CONFIG, params,
                          jax.random.key(seed))
        w = np.asarray(params["model"]["layers"]["self_attn"]["q_proj"]["kernel"], np.float64)
        got = np.asarray(dora["model"]["layers"]["self_attn"]["q_proj"]["kernel"]["magnitude"], np.float64)
        want = np.linalg.norm(w, axis=1)
        mags.append(float(np.max(np.abs(got - want) / np.abs(want))))
    _report("tree DoRA magnitude init vs numpy norm (relative)", mags)

    # combine: every case of test_matches_peft on fresh adapters per seed, recording each _rel it asserts on
    import pytest

    worst = {"factor types": [], "svd types": []}
    record: list[float] = []
    rel = comb._rel
    comb._rel = lambda x, ref: record.append(rel(x, ref)) or 0.0
    for seed in range(seeds):
        pm = comb.make_model(seed)
        for ctype, names, weights, kw in comb.CASES:
            record.clear()
            with pytest.MonkeyPatch.context() as mp:
                comb.test_matches_peft(pm, mp, ctype, names, weights, kw)
            kind = "linear" if len(names) == 1 else ctype
            worst["svd types" if kind.endswith("svd") else "factor types"].append(max(record))
        record.clear()
        with pytest.MonkeyPatch.context() as mp:
            comb.test_svd_clamp_matches_peft_under_same_signs(pm, mp)
        worst.setdefault("svd with clamp", []).append(max(record))
    comb._rel = rel
    for key, values in worst.items():
        _report(f"combine vs peft add_weighted_adapter, {key}", values)


def smollm(seeds: int) -> None:
    """The embedded SmolLM2-135M-Instruct against transformers (fp32) on chat prompts of several lengths."""
    import torch
    from transformers import AutoModelForCausalLM

    import jaxft
    import test_smollm as t
    from jaxft.io.default import embedded_model_path

    d, name = os.path.split(embedded_model_path())
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    config, params = jaxft.load_pretrained("smollm2-135m-instruct")
    tok = jaxft.load_tokenizer("smollm2-135m-instruct")
    questions = ["What is the capital of France?", "Write one sentence about the sea.", "List three prime numbers.",
                 "Translate 'good morning' into German, French and Spanish, and say which is the most formal.",
                 "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# What does fib(10) return?",
                 "Résumé: naïve café owners in Zürich ordered 12 crème brûlées. How many?"]
    _report("smollm2 logits vs transformers", [t.logits_error(config, params, hf, tok, q)
                                              for q in questions[:max(seeds, len(questions))]])


def jaxft_init(tiny_tree, seed):
    import jax

    import jaxft

    return jaxft.init_params(tiny_tree.CONFIG, jax.random.key(seed))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--only", choices=["bf16", "model", "ops", "peft", "smollm"], default=None)
    args = ap.parse_args()
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    for name, fn in (("bf16", bf16), ("model", model), ("ops", ops), ("peft", peft), ("smollm", smollm)):
        if args.only in (None, name):
            fn(args.seeds)
