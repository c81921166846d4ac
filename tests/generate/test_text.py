"""The text layer over the engine (no torch): stop strings found across token and host-check boundaries, `Chat`
reusing its slot's cache, `python -m jaxft.generate` end to end, and bad requests refused before any compute.

The model is a tiny random Llama saved with a byte-level BPE tokenizer trained here (ChatML template), so the test
runs on both CI legs; every engine shares one compiled shape (2 slots, 64 cache slots), the CLI's included. The
reference for a stopped or continued generation is the same model's plain greedy generation of the whole text."""

from __future__ import annotations

import io
import json
import sys

import jax
import numpy as np
import pytest

import jaxft
from jaxft.errors import ConfigError
from jaxft.generate import Engine, SamplingParams
from jaxft.generate.__main__ import main as generate_main
from jaxft.generate.text import Chat, Request, eos_token_ids, load_for_generation, render_chat, run

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog\n", "hello world, what is two plus two? it is four.\n",
          "user assistant system question answer please explain why the sky is blue\n"] * 20
SLOTS, MAX_LEN, CHECK = 2, 64, 8  # CHECK: tokens per host check (`run`'s check_every)


def _tokenizer():
    """Byte-level BPE over the corpus's own characters only (no byte fallback tokens: every token decodes to whole
    characters, so a prefix of the tokens decodes to a prefix of the text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=256, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
    hf.chat_template = CHATML
    return hf


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(model directory, config, params, tokenizer) of a tiny random Llama with the BPE tokenizer above."""
    tok = _tokenizer()
    config = jaxft.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                               tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    rng = np.random.default_rng(0)  # numpy, not init_params: no compilation (random norms: every weight matters)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: ((1 + 0.1 * rng.standard_normal(s.shape)) if "norm" in jax.tree_util.keystr(path)
                         else 0.2 * rng.standard_normal(s.shape)).astype(s.dtype),
        jax.eval_shape(lambda: jaxft.init_params(config, jax.random.key(0))))
    d = str(tmp_path_factory.mktemp("text") / "model")
    jaxft.save_pretrained(config, params, d, tokenizer=tok)
    config, params, tok, _ = load_for_generation(d)  # what the CLI loads: the same compiled shapes
    return d, config, params, tok


def _engine(model) -> Engine:
    _, config, params, tok = model
    return Engine(config, params, slots=SLOTS, max_len=MAX_LEN, eos_token_ids=eos_token_ids(config, tok))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


PROMPT = "the quick brown fox"
N = 24


def test_stop_string_across_tokens_and_host_checks(model):
    """A stop string made of the end of token 8 and the start of token 9 (token 0 comes from the prefill, 1-8 from
    the first `step(8)`, 9-16 from the second) ends the text before it: the tokens end with the one that completed
    it, the streamed text equals the returned text (no part of the stop string leaks), finish is "stop". A stop
    string the model never writes changes nothing (finish "length")."""
    _, _, _, tok = model
    eng = _engine(model)
    prompt = _ids(tok, PROMPT)
    ref = run(eng, tok, [Request(prompt, max_new_tokens=N)], check_every=CHECK)[0]
    assert len(ref.tokens) == N and ref.finish == "length"  # no EOS inside: the comparison below needs all N
    text = ref.text
    cut = len(tok.decode(ref.tokens[:9], skip_special_tokens=True))  # where token 9's text begins
    assert text.startswith(tok.decode(ref.tokens[:9], skip_special_tokens=True))
    # the shortest window across that boundary whose first occurrence in the text is there
    stop, at = next((text[i:j], i) for width in range(2, 8) for i in range(cut - width + 1, cut)
                    for j in [i + width] if j > cut and text.find(text[i:j]) == i and "\ufffd" not in text[i:j])
    ends = [n for n in range(1, N + 1) if stop in tok.decode(ref.tokens[:n], skip_special_tokens=True)]
    assert ends[0] >= 10  # completed by token 9 or later: after the first host check

    streamed = []
    got = run(eng, tok, [Request(prompt, max_new_tokens=N, stop=["never written", stop])], check_every=CHECK,
              on_text=lambda i, d: streamed.append(d))[0]
    assert got.text == text[:at] and got.finish == "stop"
    assert got.tokens == ref.tokens[:ends[0]]
    assert "".join(streamed) == got.text

    absent = "zqzqzq"
    assert absent not in text
    again = run(eng, tok, [Request(prompt, max_new_tokens=N, stop=[absent])], check_every=CHECK)[0]
    assert (again.text, again.tokens, again.finish) == (text, ref.tokens, "length")


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_chat_second_turn_prefills_only_the_new_tokens(model):
    """Turn 2 runs through the model only the tokens after what the slot holds (the engine's prefill token count),
    and replies exactly as a fresh engine given the whole conversation does (greedy)."""
    _, _, _, tok = model
    eng = _engine(model)
    chat = Chat(eng, tok, max_new_tokens=8)
    chat.send("hello world")
    first = chat.last.tokens
    prompt1 = render_chat(tok, chat.messages[:1])
    before = eng.counters.prefill_tokens
    reply = chat.send("what is two plus two?")
    prompt2 = render_chat(tok, chat.messages[:3])
    computed = eng.counters.prefill_tokens - before
    held = prompt1 + first[:-1]  # the last generated token was never fed back: not in the cache
    assert _common(held, prompt2) >= len(prompt1)
    assert computed == len(prompt2) - _common(held, prompt2)
    assert computed < len(prompt2) - len(prompt1) + 1

    fresh_engine = _engine(model)
    fresh = run(fresh_engine, tok, [Request(prompt2, max_new_tokens=8)])[0]
    assert fresh_engine.counters.prefill_tokens == len(prompt2)
    assert fresh.tokens == chat.last.tokens and fresh.text.strip() == reply
    chat.close()
    assert eng.free_slots() == list(range(SLOTS))


def test_bad_requests_are_refused_before_any_compute(model):
    """Each bad request: one ConfigError naming it, raised by `run` before the good requests before it are
    computed (the engine's prefill count stays 0)."""
    _, config, _, tok = model
    eng = _engine(model)
    good = Request(_ids(tok, PROMPT), max_new_tokens=4)
    bad = {"the prompt is empty": Request([], max_new_tokens=4),
           "need 70 cache slots; the engine has max_len=64": Request([5] * 60, max_new_tokens=11),
           "max_new_tokens=0 must be an integer >= 1": Request([5], max_new_tokens=0),
           f"prompt token {config.vocab_size} is not a token id": Request([5, config.vocab_size], max_new_tokens=2),
           "sampling must be a jaxft.generate.SamplingParams": Request([5], {"temperature": 1}, max_new_tokens=2),
           "stop must be a list of strings": Request([5], max_new_tokens=2, stop="x")}
    for message, request in bad.items():
        with pytest.raises(ConfigError, match=rf"^request 2: .*{message}"):
            run(eng, tok, [good, good, request])  # 2 slots: the bad one would wait for the good ones' prefill
    assert eng.counters.prefill_calls == 0
    for kw, message in [(dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
                        (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(min_p=-0.1), "min_p"),
                        (dict(min_p=1.5), "min_p"), (dict(temperature=float("nan")), "temperature")]:
        with pytest.raises(ConfigError, match=rf"^sampling parameters: {message}="):
            SamplingParams(**kw)


# ---- python -m jaxft.generate ----------------------------------------------------------------------------------

def _cli(model, *extra):
    return ["--model", model[0], "--batch-size", str(SLOTS), "--max-len", str(MAX_LEN), "--max-new-tokens", "6",
            *extra]


def _rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.strip().splitlines()]


def test_generate_cli_file_and_stdin_to_jsonl(model, tmp_path, capsys, monkeypatch):
    """Prompts from a file (a text line, a chat line, a line with its own max_new_tokens) and from stdin; JSONL out
    with the README's fields, each completion equal to `run` on the same tokens."""
    monkeypatch.setenv("JAXFT_KEEP_HOST_MEMORY", "0")  # not this test process's allocator
    _, _, _, tok = model
    messages = [{"role": "user", "content": "why is the sky blue"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(f"{PROMPT}\n\n" + json.dumps({"messages": messages}) + "\n"
                    + json.dumps({"prompt": "hello world", "max_new_tokens": 3}) + "\n")
    out = tmp_path / "out.jsonl"
    assert generate_main(_cli(model, "--input", str(path), "--output", str(out))) == 0
    rows = _rows(out.read_text())
    prompts = [_ids(tok, PROMPT), render_chat(tok, messages), _ids(tok, "hello world")]
    want = run(_engine(model), tok, [Request(p, max_new_tokens=n) for p, n in zip(prompts, [6, 6, 3])])
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r, p, w in zip(rows, prompts, want):
        assert set(r) == {"index", "completion", "finish_reason", "prompt_tokens", "completion_tokens"}
        assert (r["completion"], r["finish_reason"], r["prompt_tokens"], r["completion_tokens"]) == (
            w.text, w.finish, len(p), len(w.tokens))
    assert rows[2]["completion_tokens"] == 3 and rows[2]["finish_reason"] == "length"

    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\n"))
    assert generate_main(_cli(model)) == 0
    [row] = _rows(capsys.readouterr().out)
    assert row["index"] == 0 and row["prompt_tokens"] == len(prompts[2]) and row["completion_tokens"] == 6
    assert row["completion"].startswith(rows[2]["completion"])


def test_generate_cli_bad_input_is_one_line_exit_2(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAXFT_KEEP_HOST_MEMORY", "0")
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{PROMPT}\n" + json.dumps({"prompt": 5}) + "\n")
    cases = {str(path): f"{path}:2: a JSON line needs a non-empty \"prompt\" string or \"messages\"",
             str(tmp_path / "missing.txt"): "missing.txt: no such file"}
    for source, message in cases.items():
        capsys.readouterr()
        assert generate_main(_cli(model, "--input", source)) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        err = captured.err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
