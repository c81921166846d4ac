"""GPU training step: jaxft vs transformers + peft on the same GPU (run only where a GPU is lent; never by tests).

    python benchmarks/train_step_gpu.py                    # Llama-3.1-8B shape, LoRA r16 all-linear, bf16, 1 x 2048
    python benchmarks/train_step_gpu.py --quick            # 2 layers of the same shapes, 3 steps, no record
    python benchmarks/train_step_gpu.py --quick --cpu-smoke  # tiny shapes on CPU: checks that it runs, no record

Random weights of Llama-3.1-8B's shapes (no download), LoRA r16 alpha 32 on all linear layers, bf16 compute, full
rematerialisation, batch `--batch` x `--seq` tokens, AdamW. Each side runs in its own process (jax preallocates GPU
memory): jaxft's jitted step with the platform's fused attention (`model.attention: auto`), and transformers +
peft with sdpa attention in bf16, gradient checkpointing on (the same recomputation as full remat). Also a
1-device full fine-tuning step of a Llama-3.2-1B-shaped model (fp32 master weights and Adam state, bf16 compute).

Reported per run: tokens/s (median step), MFU, peak device memory (`memory_stats()["peak_bytes_in_use"]`) and the
compiled step's own prediction (`memory_analysis()`: arguments + outputs + temporaries - aliased). FLOPs per token,
recomputation not counted: forward 2N, input gradients 2N, weight gradients 6 N_adapter (LoRA; full fine-tuning
2N more, i.e. 6N), plus attention 6 * T * H * hd * L (causal: T/2 keys per query on average; forward 2 products,
backward 4), with N the parameters of the matmuls (embedding gather excluded, the output head included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_here, os.path.dirname(_here)]

# bf16 dense peak, FLOP/s, by device kind (the MFU denominator).
PEAK_FLOPS = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA A100-SXM4-80GB": 312e12}
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)


def matmul_params(c: dict) -> int:
    """N: parameters of the matmuls per token (attention, MLP, output head), embedding gather excluded."""
    d, hd, layers = c["hidden_size"], c["head_dim"], c["num_hidden_layers"]
    attn = d * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    mlp = 3 * d * c["intermediate_size"]
    return layers * (attn + mlp) + d * c["vocab_size"]


def lora_params(c: dict, r: int) -> int:
    """N_adapter of LoRA r on all linear layers of the decoder."""
    d, hd = c["hidden_size"], c["head_dim"]
    h, k, f = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd, c["intermediate_size"]
    shapes = [(d, h), (d, k), (d, k), (h, d), (d, f), (d, f), (f, d)]
    return c["num_hidden_layers"] * sum(r * (i + o) for i, o in shapes)


def flops_per_token(c: dict, t: int, adapter: int | None) -> float:
    """The FLOP formula of the module docstring; `adapter` None means full fine-tuning."""
    n = matmul_params(c)
    weights = 2 * n if adapter is None else 6 * adapter
    attention = 6 * t * c["num_attention_heads"] * c["head_dim"] * c["num_hidden_layers"]
    return 2 * n + 2 * n + weights + attention


def _peak_bytes(device) -> int | None:
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def jax_side(c: dict, batch: int, seq: int, steps: int, lora_r: int | None) -> dict:
    """jaxft's step: LoRA (lora_r) or full fine-tuning (None) on random bf16 (LoRA) / fp32 (full) weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxft import peft
    from jaxft.models.config import LlamaConfig
    from jaxft.models.llama import ModelOptions
    from jaxft.models.params import init_params
    from jaxft.ops.attention import attention_platform, choose_implementation
    from jaxft.train.step import StaticModel, make_train_step

    config = LlamaConfig(**c)
    spec = None if lora_r is None else peft.LoraSpec(r=lora_r, alpha=2 * lora_r, target_modules="all-linear")
    # XLA:CPU has no bf16 x bf16 -> f32 dot: the CPU smoke run computes in fp32.
    compute = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    model = StaticModel(config, spec, ModelOptions(dtype=compute, remat="full"))
    params = init_params(config, jax.random.key(0), compute if spec is not None else jnp.float32)
    if spec is None:
        trainable, frozen = params, None
    else:
        trainable, frozen = peft.init(spec, config, params, jax.random.key(1)), params
    optimizer = optax.adamw(1e-5)
    opt_state = optimizer.init(trainable)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, c["vocab_size"], (1, batch, seq)).astype(np.int32)
    batches = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids),
               "positions": jnp.asarray(np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape))}
    step = make_train_step(model, optimizer)
    compiled = step.lower(trainable, opt_state, frozen, batches, jax.random.key(2)).compile()
    mem = compiled.memory_analysis()
    predicted = None
    if mem is not None:
        predicted = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                     - mem.alias_size_in_bytes)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batches, jax.random.key(i))
        float(metrics["loss"])
        times.append(time.perf_counter() - t0)
    device = jax.devices()[0]
    return {"side": "jaxft", "attention": choose_implementation("auto", seq, c["head_dim"], None),
            "platform": attention_platform(), "device": device.device_kind, "step_s": statistics.median(times[1:]),
            "peak_bytes": _peak_bytes(device), "predicted_bytes": predicted, "loss": float(metrics["loss"])}


def hf_side(c: dict, batch: int, seq: int, steps: int, lora_r: int, cpu: bool) -> dict:
    """transformers + peft: LlamaForCausalLM of the same shapes, sdpa, bf16 (fp32 on CPU), gradient checkpointing."""
    import peft as hf_peft
    import torch
    import transformers

    device = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else torch.bfloat16
    cfg = transformers.LlamaConfig(**{k: v for k, v in c.items() if k != "tie_word_embeddings"},
                                   tie_word_embeddings=c.get("tie_word_embeddings", False),
                                   attn_implementation="sdpa")
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = hf_peft.get_peft_model(model, hf_peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r,
                                                             target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, c["vocab_size"], (batch, seq), device=device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        times.append(time.perf_counter() - t0)
    peak = None if cpu else torch.cuda.max_memory_allocated()
    return {"side": "hf", "step_s": statistics.median(times[1:]), "peak_bytes": peak,
            "device": "cpu" if cpu else torch.cuda.get_device_name()}


def _child(args) -> None:
    if args.cpu_smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    c = json.loads(args.config)
    if args.side == "hf":
        out = hf_side(c, args.batch, args.seq, args.steps, args.lora_r, args.cpu_smoke)
    else:
        out = jax_side(c, args.batch, args.seq, args.steps, None if args.side == "full" else args.lora_r)
    print("RESULT " + json.dumps(out), flush=True)


def _run(side: str, c: dict, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--config", json.dumps(c), "--batch",
           str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--lora-r", str(args.lora_r)]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def _gib(x) -> str:
    return "n/a" if x is None else f"{x / 2 ** 30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers, 3 steps, no record")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (does it run?)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--no-hf", action="store_true", help="skip transformers + peft")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--side", choices=["jax", "hf", "full"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return _child(args)
    big, small = dict(LLAMA_8B), dict(LLAMA_1B)
    if args.cpu_smoke:
        big, small, args.seq, args.batch = dict(TINY), dict(TINY, tie_word_embeddings=True), 256, 1
    if args.quick:
        big["num_hidden_layers"] = small["num_hidden_layers"] = 2
        args.steps = 3
    jx = _run("jax", big, args)
    hf = None if args.no_hf else _run("hf", big, args)
    full = _run("full", small, args)
    tokens = args.batch * args.seq
    peak = PEAK_FLOPS.get(jx["device"])
    lines = [f"Device: {jx['device']} (attention path `{jx['attention']}`); batch {args.batch} x {args.seq} tokens, "
             f"{big['num_hidden_layers']} layers.", "",
             "| run | tokens/s | MFU | peak memory | compiled prediction |", "|---|---|---|---|---|"]
    flops = flops_per_token(big, args.seq, lora_params(big, args.lora_r))
    for name, r, f in [("jaxft LoRA r16 (8B shape)", jx, flops), ("transformers + peft LoRA r16 (sdpa)", hf, flops),
                       ("jaxft full FT (1B shape)", full, flops_per_token(small, args.seq, None))]:
        if r is None:
            continue
        tps = tokens / r["step_s"]
        mfu = "n/a" if peak is None else f"{100 * tps * f / peak:.1f}%"
        lines.append(f"| {name} | {tps:,.0f} | {mfu} | {_gib(r['peak_bytes'])} | {_gib(r.get('predicted_bytes'))} |")
    if hf is not None:
        lines += ["", f"jaxft / HF tokens/s: {hf['step_s'] / jx['step_s']:.2f}x (goal >= 1.5x); MFU goal >= 50%."]
    lines += [f"FLOPs per token (LoRA, 8B shape): {flops:.4g} = 2N + 2N + 6 N_adapter + 6 T H hd L, N = "
              f"{matmul_params(big):,}, N_adapter = {lora_params(big, args.lora_r):,}; recomputation not counted."]
    print("\n".join(lines))
    if not (args.quick or args.cpu_smoke or args.no_record):
        from common import record
        record("train_step_gpu", lines, "python benchmarks/train_step_gpu.py")


if __name__ == "__main__":
    main()
