"""The real SmolLM2-135M with every linear projection NF4-quantised (double quantisation, as QLoRA does; the
embeddings, norms and the tied head stay dense) keeps its perplexity on held-out English text shipped with the
package (`jaxft/eval/texts/general_english.txt`, not task data) within 5% of the unquantised model's; both in fp32."""

from __future__ import annotations

import importlib.resources

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.quant import NF4Tensor, quantize

_PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
WINDOW = 512  # tokens per window; the windows do not overlap (each token is scored once, with <= 511 of context)


def _nf4(params: dict) -> dict:
    """`params` with each stacked linear projection `[L, in, out]` replaced by its NF4Tensor."""
    layers = dict(params["model"]["layers"])
    for group, names in _PROJECTIONS.items():
        layers[group] = {**layers[group], **{n: {**layers[group][n], "kernel": quantize(layers[group][n]["kernel"])}
                                            for n in names}}
    return {**params, "model": {**params["model"], "layers": layers}}


def _perplexity(config, params, ids: np.ndarray) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of WINDOW tokens (fp32 logits)."""
    fwd = jax.jit(lambda p, x: jaxft.forward(config, p, x))
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, WINDOW):
        x = ids[s: s + WINDOW + 1]
        if len(x) < 2:
            break
        logits = fwd(params, jnp.asarray(x[None, :-1]))[0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll -= float(jnp.sum(jnp.take_along_axis(logp, jnp.asarray(x[1:, None]), axis=-1)))
        count += len(x) - 1
    return float(np.exp(nll / count))


@pytest.mark.slow  # 50 s on 2 busy cores: two perplexity passes of the real model
@pytest.mark.xfail(strict=True, reason="issue 15's goal is not met: measured fp32 33.22 vs NF4 40.92 (+23.2%) on "
                   "1,705 tokens (the embedded SmolLM2 is itself a Q4_1 GGUF; NF4 re-quantises its dequantised "
                   "weights); strict, so a fix that meets the goal turns this into a failure to remove the mark")
def test_nf4_smollm2_perplexity_within_5_percent(smollm_jax, smollm_tokenizer):
    config, params = smollm_jax
    text = importlib.resources.files("jaxft.eval").joinpath("texts/general_english.txt").read_text()
    ids = np.asarray(smollm_tokenizer(text)["input_ids"], np.int32)
    assert len(ids) > 1500  # the whole text, not a stub
    q = _nf4(params)
    assert all(isinstance(q["model"]["layers"][g][n]["kernel"], NF4Tensor) for g, ns in _PROJECTIONS.items()
               for n in ns)
    ppl, ppl_nf4 = _perplexity(config, params, ids), _perplexity(config, q, ids)
    print(f"SmolLM2-135M perplexity on general_english.txt ({len(ids)} tokens): fp32 {ppl:.3f}, NF4 {ppl_nf4:.3f} "
          f"({ppl_nf4 / ppl - 1:+.2%})")
    assert ppl < 40  # a sane English model on this text (measured 33.22)
    assert ppl_nf4 / ppl - 1 <= 0.05
