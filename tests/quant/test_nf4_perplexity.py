"""The real SmolLM2-135M with every linear projection NF4-quantised (double quantisation, as QLoRA does; the
embeddings, norms and the tied head stay dense) has the perplexity bitsandbytes' NF4 gives it, on held-out English
text shipped with the package (`jaxft/eval/texts/general_english.txt`, not task data), fp32.

jaxft's side is the trainer's quantiser (`quantize_params`) and `jaxft.eval.perplexity` (windows of 512, disjoint);
bitsandbytes' side is transformers' model of the same checkpoint with each q/k/v/o/gate/up/down weight replaced by
`dequantize_4bit(quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True))` (what its Linear4bit
multiplies by; the embedded GGUF cannot be loaded with `BitsAndBytesConfig`), scored on the same windows.

Issue 15's goal (NF4 within 5% of the unquantised perplexity) is a property of NF4 on this model, not of jaxft:
bitsandbytes gives the same +23.2% (benchmarks/RESULTS.md and `scripts/nf4_perplexity_vs_bnb.py` hold the numbers,
with and without double quantisation, fp32 and bf16 compute)."""

from __future__ import annotations

import importlib.resources

import numpy as np
import pytest

from jaxft.eval import EvalModel, perplexity, window_spans
from jaxft.quant import NF4Tensor, QuantPlan, quantize_params
from optional_import import optional

torch = optional("torch")
bnbf = optional("bitsandbytes.functional")
functional_call = optional("torch.func", "functional_call")

WINDOW = 512
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Measured (fp32, jax 0.10.2, 1,701 tokens scored): jaxft's NF4 perplexity / bitsandbytes' - 1 = +2.4e-5 (41.0073 vs
# 41.0063; without double quantisation +1.7e-5); the unquantised model's jaxft / transformers ratio is of the same
# size (33.289 vs 33.288): fp32 orders of summation through 30 layers, not NF4. Bound 1e-4 (4.2x). Quantising
# without double quantisation moves the perplexity by 2.4e-3 (41.104), 24x the bound: the test tells even that apart.
RTOL = 1e-4


def _bnb_perplexity(hf, ids: list[int], *, quantized: bool = True) -> float:
    """Perplexity of transformers' `hf` with its linear projections in bitsandbytes' NF4, on `jaxft.eval.perplexity`'s
    disjoint windows of WINDOW tokens."""
    weights = {}
    if quantized:
        for name, p in hf.named_parameters():
            if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
                q, state = bnbf.quantize_4bit(p.detach(), blocksize=64, quant_type="nf4", compress_statistics=True)
                weights[name] = bnbf.dequantize_4bit(q, state)
    nll, n = 0.0, 0
    with torch.no_grad():
        for begin, end, first in window_spans(len(ids), WINDOW, WINDOW):
            x = torch.tensor([ids[begin:end]])
            logits = functional_call(hf, weights, (x,)).logits[0, :-1]
            lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0].double().numpy()
            nll -= float(np.sum(lp[first - begin - 1:]))
            n += end - first
    return float(np.exp(nll / n))


@pytest.mark.slow  # 24 s on 2 busy cores (call; the fixtures are shared): one jaxft pass, two of transformers
def test_nf4_smollm2_perplexity_equals_bitsandbytes(smollm_jax, smollm_tokenizer, smollm_hf):
    config, params = smollm_jax
    text = importlib.resources.files("jaxft.eval").joinpath("texts/general_english.txt").read_text()
    ids = list(smollm_tokenizer(text)["input_ids"])
    assert len(ids) > 1500  # the whole text, not a stub
    q = quantize_params(params, QuantPlan())  # all linear projections, double quantisation: the trainer's quantiser
    assert all(isinstance(q["model"]["layers"][g][n]["kernel"], NF4Tensor)
               for g, ns in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])) for n in ns)
    ours = perplexity(EvalModel("nf4", config, q, smollm_tokenizer), [text], window=WINDOW, stride=WINDOW)
    theirs, dense = _bnb_perplexity(smollm_hf, ids), _bnb_perplexity(smollm_hf, ids, quantized=False)
    print(f"SmolLM2-135M perplexity on general_english.txt ({ours.tokens} tokens scored, {ours.windows} windows): "
          f"unquantised {dense:.3f}, NF4 jaxft {ours.perplexity:.3f}, NF4 bitsandbytes {theirs:.3f} "
          f"({theirs / dense - 1:+.1%}; jaxft/bitsandbytes - 1 = {ours.perplexity / theirs - 1:+.1e})")
    assert dense < 40  # a sane English model on this text
    assert abs(ours.perplexity / theirs - 1) < RTOL
