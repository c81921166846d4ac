"""Is SmolLM2-135M's NF4 perplexity a property of NF4 or of jaxft? The embedded SmolLM2-135M-Instruct's perplexity on
`jaxft/eval/texts/general_english.txt` (windows of 512, disjoint: `jaxft.eval.perplexity(..., stride=512)`) with every
linear projection NF4-quantised, three ways: jaxft's NF4 (`jaxft.quant.quantize_params`) through `jaxft.eval`,
and transformers' model of the same weights with each q/k/v/o/gate/up/down weight replaced by bitsandbytes'
`dequantize_4bit(quantize_4bit(W, blocksize=64, quant_type="nf4"))` (what bitsandbytes' Linear4bit multiplies by; the
GGUF checkpoint cannot be loaded with `BitsAndBytesConfig`), each with and without double quantisation, in fp32
and bf16 compute; and both unquantised.

    PYTHONPATH=. python scripts/nf4_perplexity_vs_bnb.py [--bf16]

Cost on 2 CPU cores: about 1 minute for fp32 (six perplexity passes of 4 windows), bf16 adds about as much (CPU bf16
matmuls are slow).
"""

from __future__ import annotations

import argparse
import importlib.resources
import os

import bitsandbytes.functional as bnbf
import jax.numpy as jnp
import numpy as np
import torch
from torch.func import functional_call
from transformers import AutoModelForCausalLM

import jaxft
from jaxft import quant
from jaxft.eval import EvalModel, perplexity, window_spans
from jaxft.io.default import embedded_model_path

WINDOW = 512
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bnb_weights(dense: dict[str, torch.Tensor], double_quant: bool) -> dict[str, torch.Tensor]:
    """`dense` (fp32) with each linear projection's weight as bitsandbytes dequantises its NF4 (fp32 quant state,
    CPU)."""
    out = dict(dense)
    for name, w in dense.items():
        if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
            q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
            out[name] = bnbf.dequantize_4bit(q, state)
    return out


def torch_perplexity(hf, weights: dict, ids: list[int], dtype=torch.float32) -> float:
    """`jaxft.eval.perplexity`'s windows and sum, on transformers' model with `weights` swapped in."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for begin, end, first in window_spans(len(ids), WINDOW, WINDOW):
            x = torch.tensor([ids[begin:end]])
            w = {k: v.to(dtype) for k, v in weights.items()}
            logits = functional_call(hf, w, (x,)).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0].double().numpy()
            nll -= float(np.sum(lp[first - begin - 1:]))
            n += end - first
    return float(np.exp(nll / n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bf16", action="store_true", help="also bf16 compute (slow on CPU)")
    args = ap.parse_args()
    text = importlib.resources.files("jaxft.eval").joinpath("texts/general_english.txt").read_text()
    tok = jaxft.load_tokenizer("smollm2-135m-instruct")
    ids = list(tok(text)["input_ids"])
    config, params = jaxft.load_pretrained("smollm2-135m-instruct")
    d, name = os.path.split(embedded_model_path())
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    dense = {k: v.detach().clone() for k, v in hf.named_parameters()}
    dtypes = [("fp32", jnp.float32, torch.float32)] + ([("bf16", jnp.bfloat16, torch.bfloat16)] if args.bf16 else [])
    print(f"{len(ids)} tokens, windows of {WINDOW} (disjoint)")
    for label, jdt, tdt in dtypes:
        options = jaxft.ModelOptions(dtype=jdt)
        hf.to(tdt)
        ref = perplexity(EvalModel("dense", config, params, tok, options), [text], window=WINDOW, stride=WINDOW)
        ref_t = torch_perplexity(hf, dense, ids, tdt)
        print(f"{label}: unquantised  jaxft {ref.perplexity:.3f}  transformers {ref_t:.3f}", flush=True)
        for dq in (True, False):
            q = quant.quantize_params(params, quant.QuantPlan(double_quant=dq))
            ours = perplexity(EvalModel("nf4", config, q, tok, options), [text], window=WINDOW, stride=WINDOW)
            theirs = torch_perplexity(hf, bnb_weights(dense, dq), ids, tdt)
            print(f"{label}: NF4 double_quant={dq!s:5}  jaxft {ours.perplexity:.3f} "
                  f"({ours.perplexity / ref.perplexity - 1:+.1%})  bitsandbytes {theirs:.3f} "
                  f"({theirs / ref_t - 1:+.1%})  jaxft/bnb - 1 = {ours.perplexity / theirs - 1:+.2e}", flush=True)


if __name__ == "__main__":
    main()
