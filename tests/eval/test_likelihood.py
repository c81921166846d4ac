"""Log-likelihood scores against transformers' logits on a tiny random model (fp32): multiple-choice items as
lm-evaluation-harness scores them, and windowed perplexity computed the way transformers' perplexity guide does
(labels -100 outside each window's new tokens), with and without a LoRA adapter (peft's model as the reference)."""

import copy

import numpy as np
import pytest

from jaxft.eval import ChoiceItem, encode_pair, multiple_choice, perplexity, window_spans
from jaxft.eval.compare import general_text
from jaxft.eval.model import TunedSource, load_tuned
from optional_import import optional

torch = optional("torch")
peft_lib = optional("peft")

ITEMS = [
    ChoiceItem("The capital of France is", ("Paris", "London", "a city on the river Seine"), 0),
    ChoiceItem("2 + 2 =", ("4", "five", "22"), 2),
    ChoiceItem("Question: what colour is the sky?\nAnswer:", ("blue", "green with orange stripes"), 1),
    ChoiceItem("Grüße aus ", ("München", "Berlin"), 0),
]


def _torch_loglik(hf, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
    n = len(ctx)
    return float(sum(logp[n - 1 + j, t] for j, t in enumerate(cont)))


def test_encode_pair_is_lm_evals():
    """Trailing context spaces move to the continuation; the continuation's tokens are those of the joined text."""
    import jaxft

    tok = jaxft.load_tokenizer("smollm2-135m-instruct")
    ctx, cont = encode_pair(tok, "The sky is ", "blue")
    assert ctx == tok("The sky is", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tok("The sky is blue", add_special_tokens=False)["input_ids"]
    assert tok.decode(cont) == " blue"


def test_multiple_choice_matches_transformers(tiny_base, tiny_hf):
    """Summed continuation log-probs equal transformers' (float64 sums of its fp32 log-softmax): measured at most
    1.3e-7 relative over these 10 choices on 3 model seeds (sums of 1-9 tokens); tolerance 1e-6. acc and acc_norm
    follow from the reference's numbers (argmax; / UTF-8 bytes)."""
    got = multiple_choice(tiny_base, ITEMS, batch_size=4)
    acc, acc_norm = [], []
    for it, ll in zip(ITEMS, got.loglik):
        ref = np.asarray([_torch_loglik(tiny_hf, *encode_pair(tiny_base.tokenizer, it.context, " " + c))
                          for c in it.choices])
        np.testing.assert_allclose(ll, ref, rtol=1e-6)
        acc.append(float(np.argmax(ref) == it.answer))
        acc_norm.append(float(np.argmax(ref / [len(c.encode()) for c in it.choices]) == it.answer))
    assert got.acc.tolist() == acc and got.acc_norm.tolist() == acc_norm
    assert acc != acc_norm  # the items are built so that length normalisation changes a verdict


def _torch_ppl(hf, ids, window, stride):
    """transformers' guide "Perplexity of fixed-length models", with the token count taken from the shifted labels."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg = end - prev_end
        inp = torch.tensor([ids[begin:end]])
        labels = inp.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            logits = hf(inp).logits
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1].double(), labels[0, 1:], ignore_index=-100,
                                                       reduction="sum"))
        count += int((labels[0, 1:] != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return nll, count


TEXT_CHARS = 1200


@pytest.mark.parametrize("window,stride", [(64, 64), (64, 24), (128, 100)])
def test_perplexity_matches_transformers(tiny_base, tiny_hf, window, stride):
    """Same windows, same tokens scored; total NLL within 1e-6 relative (measured at most 1.2e-8 over these three
    window/stride pairs on about 250 tokens, 3 model seeds)."""
    text = general_text()[:TEXT_CHARS]
    ids = tiny_base.tokenizer(text)["input_ids"]
    got = perplexity(tiny_base, [text], window=window, stride=stride, batch_size=3)
    nll, count = _torch_ppl(tiny_hf, ids, window, stride)
    # overlapping windows score every token but the first; disjoint chunks also skip each chunk's first token
    assert got.tokens == count == len(ids) - 1 - (0 if stride < window else (len(ids) - 1) // window)
    assert got.nll == pytest.approx(nll, rel=1e-6)
    assert got.windows == len(window_spans(len(ids), window, stride))


def test_window_spans_cover_each_token_once():
    for n, w, s in [(10, 4, 4), (10, 4, 3), (10, 4, 1), (3, 8, 4), (257, 64, 24)]:
        spans = window_spans(n, w, s)
        scored = [t for _, end, first in spans for t in range(first, end)]
        assert scored == [t for t in range(1, n) if s < w or t % w]  # chunks: a chunk's first token has no context
        assert all(end - begin <= w and begin < first for begin, end, first in spans)


def test_adapter_perplexity_matches_peft(tiny_dir, tiny_base, tiny_hf, tmp_path):
    """A peft LoRA adapter (random B, so it changes the model) loaded as the tuned model: its perplexity equals
    peft's model's on the same windows (1e-6 relative; measured at most 8.2e-9 on 3 seeds) and differs from the
    base's by far more
    than that (0.23% here)."""
    cfg = peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                              init_lora_weights=False)
    model = peft_lib.get_peft_model(copy.deepcopy(tiny_hf), cfg).eval()
    model.save_pretrained(str(tmp_path / "adapter"))
    tuned = load_tuned(TunedSource("adapter", str(tmp_path / "adapter"), None), tiny_base)
    text = general_text()[:TEXT_CHARS]
    ids = tiny_base.tokenizer(text)["input_ids"]
    got = perplexity(tuned, [text], window=64, stride=32)
    nll, count = _torch_ppl(model, ids, 64, 32)
    assert got.tokens == count and got.nll == pytest.approx(nll, rel=1e-6)
    base_nll, _ = _torch_ppl(tiny_hf, ids, 64, 32)
    assert abs(nll - base_nll) > 1e-3 * abs(base_nll)


def _torch_ppl_virtual(model, ids, window, stride, n_virtual):
    """As `_torch_ppl` for a peft prompt-tuning model, whose logits start with its `n_virtual` virtual tokens."""
    nll, prev_end = 0.0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        inp = torch.tensor([ids[begin:end]])
        labels = inp.clone()
        labels[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            logits = model(input_ids=inp).logits[:, n_virtual:]
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1].double(), labels[0, 1:], ignore_index=-100,
                                                       reduction="sum"))
        prev_end = end
        if end == len(ids):
            break
    return nll


def test_prompt_tuning_and_merged_models_match_peft(tiny_base, tiny_hf, tmp_path):
    """The other tuned-model paths: a peft prompt-tuning adapter (virtual tokens enter through the model's inputs)
    and a merged model directory without a tokenizer (the base's is used), each against peft's model on the same
    windows (1e-6 relative; measured 1.1e-9 and 2.7e-9)."""
    text = general_text()[:600]
    ids = tiny_base.tokenizer(text)["input_ids"]
    cfg = peft_lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    torch.manual_seed(1)
    pt = peft_lib.get_peft_model(copy.deepcopy(tiny_hf), cfg).eval()
    with torch.no_grad():
        pt.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    pt.save_pretrained(str(tmp_path / "pt"))
    tuned = load_tuned(TunedSource("adapter", str(tmp_path / "pt"), None), tiny_base)
    assert tuned.spec is not None
    got = perplexity(tuned, [text], window=64, stride=32)
    ref = _torch_ppl_virtual(pt, ids, 64, 32, 4)
    assert got.nll == pytest.approx(ref, rel=1e-6)
    assert got.nll != pytest.approx(perplexity(tiny_base, [text], window=64, stride=32).nll, rel=1e-4)

    lora = peft_lib.get_peft_model(copy.deepcopy(tiny_hf), peft_lib.LoraConfig(
        r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"], init_lora_weights=False)).eval()
    nll_ref, _ = _torch_ppl(lora, ids, 64, 32)
    lora.merge_and_unload().save_pretrained(str(tmp_path / "merged"))
    merged = load_tuned(TunedSource("merged", str(tmp_path / "merged"), None), tiny_base)
    assert merged.tokenizer is tiny_base.tokenizer
    assert perplexity(merged, [text], window=64, stride=32).nll == pytest.approx(nll_ref, rel=1e-6)
