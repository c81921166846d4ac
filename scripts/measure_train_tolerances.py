"""Measure the errors behind the numerical tolerances of tests/train across seeds (the tests' own helpers, other
seeds), so each tolerance can be stated with its margin. Prints one line per quantity: the largest error over seeds.

    python scripts/measure_train_tolerances.py [--seeds 3]

What it runs: the optimizer against torch AdamW (tests/train/test_optim.py, every case, fresh trees and gradients
per seed); the trainer against transformers/peft (tests/train/test_trainer_parity.py: full fine-tuning with 1 and 2
micro-batches, LoRA fp32 and bf16, fresh batches per seed); the export check on the tiny Qwen2
(tests/train/test_export_verify.py: merged and adapter, all layers and the first 2, fresh adapter values per seed);
the export check of bf16 runs (`model.param_dtype: bfloat16`, whose default `export.verify_tolerance` this measures):
LoRA on all linear layers of tiny random Llama/Qwen2 models, adapters of a trained size and of the tests' size, full
fine-tuning, and (`--smollm`) the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "train")]


def optim(seeds: int) -> None:
    import test_optim as t

    for case, (make_tree, cfg, lr_lambda) in sorted(t.CASES.items()):
        worst = 0.0
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            tree = make_tree(rng)
            grads = [t.jax.tree.map(lambda x: (rng.standard_normal(x.shape) * rng.uniform(0.05, 1.5)).astype(
                np.float32), tree) for _ in range(t.STEPS)]
            ours, ref = t._jax_run(tree, grads, cfg, t.STEPS), t._torch_run(tree, grads, cfg, lr_lambda)
            worst = max(worst, max(np.max(np.abs(ours[n] - ref[n])) / np.max(np.abs(ref[n])) for n in ref))
        print(f"optim {case}: max relative param error {worst:.2e} ", flush=True)


def parity(seeds: int) -> None:
    import jax
    import jax.numpy as jnp

    import jaxft
    import test_trainer_parity as t
    from hf_models import hf_tiny, rel_err
    from trainer_ref import make_batches, token_loss_sum, torch_train

    base = os.path.join(tempfile.mkdtemp(), "base")
    hf_tiny("llama_gqa_tied").save_pretrained(base)
    stats: dict[str, float] = {}

    def note(name: str, value: float) -> None:
        stats[name] = max(stats.get(name, 0.0), value)

    for seed in range(seeds):
        for accum in (1, 2):
            batches = make_batches(t.STEPS, accum, t.B, t.T, vocab=97, seed=100 + 10 * seed + accum)
            hf = hf_tiny("llama_gqa_tied")
            ref = torch_train(hf, batches, **t.OPT)
            config, params = jaxft.load_pretrained(base)
            trained, got = t._jax_train(config, jax.tree.map(lambda a: a.astype(jnp.float32), params), None, None,
                                        batches)
            note(f"full accum{accum} loss", float(np.max(np.abs(np.array(got["loss"]) - ref["loss"]) / ref["loss"])))
            note(f"full accum{accum} grad norm", float(np.max(np.abs(np.array(got["grad_norm"]) - ref["grad_norm"])
                                                              / ref["grad_norm"])))
            sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
            note(f"full accum{accum} weights", max(
                rel_err(np.asarray(trained["model"]["embed_tokens"]["weight"]), sd["model.embed_tokens.weight"]),
                rel_err(np.asarray(trained["model"]["layers"]["self_attn"]["q_proj"]["kernel"][1]),
                        sd["model.layers.1.self_attn.q_proj.weight"].T),
                rel_err(np.asarray(trained["model"]["norm"]["weight"]), sd["model.norm.weight"])))
            if accum == 2:
                b = batches[0]
                hf0 = hf_tiny("llama_gqa_tied")
                with t.torch.no_grad():
                    parts = [token_loss_sum(hf0, b["input_ids"][a], b["segment_ids"][a], b["loss_mask"][a])
                             for a in range(2)]
                token_mean = float(sum(p[0] for p in parts)) / sum(p[1] for p in parts)
                note("accum step-0 token-mean loss", abs(got["loss"][0] - token_mean) / token_mean)
        batches = make_batches(t.STEPS, 2, t.B, t.T, vocab=97, seed=200 + seed)
        for dtype in (jnp.float32, jnp.bfloat16):
            hf, config, params, spec, adapter = t._lora_pair(base)
            ref = torch_train(hf, batches, **dict(t.OPT, lr=1e-2))
            trained, got = t._jax_train(config, adapter, params, spec, batches, lr=1e-2, dtype=dtype)
            name = "lora fp32" if dtype == jnp.float32 else "lora bf16"
            note(f"{name} loss", float(np.max(np.abs(np.array(got["loss"]) - ref["loss"]) / ref["loss"])))
            if dtype == jnp.float32:
                note(f"{name} grad norm", float(np.max(np.abs(np.array(got["grad_norm"]) - ref["grad_norm"])
                                                       / ref["grad_norm"])))
                sd = {k: v.detach().numpy() for k, v in hf.state_dict().items() if "lora_" in k}
                for i in range(config.num_hidden_layers):
                    node = trained["model"]["layers"]["self_attn"]["v_proj"]["kernel"]
                    key = f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_"
                    note(f"{name} weights", max(rel_err(np.asarray(node["lora_b"][i]), sd[key + "B.default.weight"].T),
                                                rel_err(np.asarray(node["lora_a"][i]), sd[key + "A.default.weight"].T)))
        print(f"parity seed {seed} done", flush=True)
    for name, value in sorted(stats.items()):
        print(f"parity {name}: max relative error {value:.2e}", flush=True)


def export_check(seeds: int) -> None:
    import jax

    import test_export_verify as t

    class Factory:
        def mktemp(self, name):
            import pathlib

            return pathlib.Path(tempfile.mkdtemp(prefix=name))

    tiny = t.tiny.__wrapped__(Factory())
    worst: dict[str, float] = {}
    for seed in range(seeds):
        for method in ("lora", "prefix"):
            tiny.adapters.pop(method, None)
            cfg, model, adapter, frozen = t._run(tiny, f"m{seed}{method}", method)
            rng = np.random.default_rng(seed + 10)  # other adapter values than the test's
            tiny.adapters[method] = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32),
                                                 adapter)
            for layers in (None, t.K):
                extra = {} if layers is None else {"verify_layers": layers}
                out, *_ = t._export(tiny, f"e{seed}{method}{layers}", method, **extra)
                for kind in ("adapter", "merged"):
                    if f"{kind} verify (rel. err)" in out:
                        key = f"{method} {kind} {'all' if layers is None else 'first 2'} layers"
                        worst[key] = max(worst.get(key, 0.0), out[f"{kind} verify (rel. err)"])
    for name, value in sorted(worst.items()):
        print(f"export check {name}: max relative logit error {value:.2e}", flush=True)


def export_bf16(seeds: int, smollm: bool) -> None:
    """The export check's max relative logit error for runs with bf16 weights: jaxft's float32 logits of the bf16
    base (plus the float32 adapter) against peft on the original float32 base (adapter) and transformers on the
    merged files (the merged weights as exported)."""
    import types

    import jax
    import jax.numpy as jnp

    import jaxft
    from hf_models import hf_tiny
    from jaxft import peft as jpeft
    from jaxft.train.config import method_spec, parse_config
    from jaxft.train.exports import export_all, verify_tolerance
    from jaxft.train.step import StaticModel

    tmp = tempfile.mkdtemp()
    data = os.path.join(tmp, "train.jsonl")
    with open(data, "w") as f:
        f.write('{"text": "unused"}\n')
    worst: dict[str, float] = {}
    default = None

    def run(name, path, method, seed, scale, ids):
        nonlocal default
        raw = {"output_dir": os.path.join(tmp, name), "model": {"path": path, "param_dtype": "bfloat16",
                                                                  "compute_dtype": "bfloat16"},
               "data": {"train": [data]}, "method": method,
               "export": {"adapter": method["type"] != "full", "merged": True, "verify": "on",
                          "verify_tolerance": 1e9}}
        cfg = parse_config(raw)
        default = verify_tolerance(parse_config(dict(raw, export={})))
        spec = method_spec(cfg.method)
        config, params = jaxft.load_pretrained(path, dtype="bfloat16")
        if spec is None:
            trainable, frozen = jax.tree.map(lambda a: a.astype(jnp.float32), params), None
        else:
            trainable = jpeft.init(spec, config, params, jax.random.key(seed))
            rng = np.random.default_rng(seed + 20)
            trainable = jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype), trainable)
            frozen = params
        model = StaticModel(config, spec, jaxft.ModelOptions(dtype=jnp.bfloat16, scan_layers=False))
        prepared = types.SimpleNamespace(eval=[types.SimpleNamespace(ids=r) for r in ids])
        return export_all(cfg, model, trainable, frozen, None, prepared, {"eval loss": 1.0})

    lora = {"type": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}
    for variant in ("llama_gqa_tied", "llama_mqa_bias", "qwen2"):
        for seed in range(seeds):
            path = os.path.join(tmp, f"{variant}{seed}")
            hf_tiny(variant, seed).save_pretrained(path)
            ids = np.random.default_rng(seed).integers(0, 97, (2, 64))
            for method, scale in ((lora, 0.02), (lora, 0.3), ({"type": "full"}, 0.0)):
                out = run(f"{variant}{seed}{method['type']}{scale}", path, method, seed, scale, ids)
                for kind in ("adapter", "merged"):
                    if f"{kind} verify (rel. err)" in out:
                        key = f"tiny {method['type']} (noise {scale}) {kind}"
                        worst[key] = max(worst.get(key, 0.0), out[f"{kind} verify (rel. err)"])
        print(f"export bf16 {variant} done", flush=True)
    if smollm:
        from jaxft.io.tokenizer import load_tokenizer

        tok = load_tokenizer("smollm2-135m-instruct")
        texts = ["The capital of France is Paris, and the capital of Italy is Rome. " * 4,
                 "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # five " * 3]
        rows = [tok(t, add_special_tokens=False)["input_ids"][:64] for t in texts]
        ids = np.stack([r[:min(map(len, rows))] for r in rows])
        for seed in range(min(seeds, 2)):
            out = run(f"smollm{seed}", "smollm2-135m-instruct", lora, seed, 0.02, ids)
            for kind in ("adapter", "merged"):
                key = f"smollm2 lora (noise 0.02) {kind}"
                worst[key] = max(worst.get(key, 0.0), out[f"{kind} verify (rel. err)"])
    for name, value in sorted(worst.items()):
        print(f"export check bf16 {name}: max relative logit error {value:.2e}", flush=True)
    print(f"export.verify_tolerance default for bf16 weights today: {default:.0e}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", choices=["optim", "parity", "export", "export_bf16"], default=None)
    ap.add_argument("--smollm", action="store_true", help="export_bf16 also on the embedded SmolLM2 (slow)")
    args = ap.parse_args()
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    for name, fn in (("optim", optim), ("parity", parity), ("export", export_check)):
        if args.only in (None, name):
            fn(args.seeds)
    if args.only in (None, "export_bf16"):
        export_bf16(args.seeds, args.smollm)
