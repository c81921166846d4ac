"""Chat rendering and loss masks, checked against references computed differently from the implementation:

- transformers' own `return_assistant_tokens_mask` (char offsets of `{% generation %}` blocks) on a copy of SmolLM2's
  template with generation markers added, versus our prefix-diff mask on SmolLM2's marker-free template;
- decoding each run of masked tokens and comparing with the message contents + the end-of-turn token;
- `apply_chat_template(tokenize=True)` of the whole conversation for the token ids.
"""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import (
    CHATML_TEMPLATE,
    LLAMA3_NO_BOS_TEMPLATE,
    SMOL_GENERATION_TEMPLATE,
    make_tiny_tokenizer,
)

from jaxft.data.formats import parse_record
from jaxft.data.render import Renderer, truncate
from jaxft.schema import ConfigError

CONVS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, like the sky.\nOr green."},
    ],
    [
        {"role": "user", "content": "Translate 'chat' to English, then say ünïcödé ✓."},
        {"role": "assistant", "content": "cat ünïcödé ✓"},
        {"role": "user", "content": "thanks"},
    ],
]


def _conv(messages, fmt="messages"):
    c = parse_record({"messages": messages}, fmt)
    assert not isinstance(c, str), c
    return c


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    d = np.diff(padded)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def _decoded_runs(tok, ex) -> list[str]:
    return [tok.decode(ex.ids[a:b].tolist(), skip_special_tokens=False) for a, b in _runs(ex.mask)]


def test_smollm2_mask_matches_transformers_generation_mask(smol):
    r = Renderer(smol)
    # the real template has no {% generation %} markers, so transformers' mask is silently all zero
    silent = smol.apply_chat_template(CONVS[0], return_assistant_tokens_mask=True, return_dict=True)
    assert sum(silent["assistant_masks"]) == 0
    examples = r.encode_chats([_conv(m) for m in CONVS], "assistant")
    for messages, ex in zip(CONVS, examples):
        ref = smol.apply_chat_template(
            messages, chat_template=SMOL_GENERATION_TEMPLATE, return_assistant_tokens_mask=True, return_dict=True
        )
        assert ex.ids.tolist() == list(ref["input_ids"])
        assert ex.ids.tolist() == list(smol.apply_chat_template(messages, return_dict=False))
        np.testing.assert_array_equal(ex.mask, np.asarray(ref["assistant_masks"], bool))


def test_smollm2_trained_span_is_content_plus_im_end(smol):
    r = Renderer(smol)
    for messages, ex in zip(CONVS, r.encode_chats([_conv(m) for m in CONVS], "assistant")):
        expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert _decoded_runs(smol, ex) == expected
        # the "\n" after each trained <|im_end|> is outside the loss
        for a, b in _runs(ex.mask):
            assert ex.ids[b - 1] == smol.convert_tokens_to_ids("<|im_end|>")
            assert b == len(ex) or not ex.mask[b]
        assert not ex.mask[0]
        assert ex.ids[:2].tolist() != [smol.bos_token_id] * 2  # no double BOS
        # SmolLM2 adds its default system prompt when the conversation has none
        head = smol.decode(ex.ids[:30].tolist())
        assert ("You are a helpful AI assistant named SmolLM" in head) == (messages[0]["role"] != "system")


@pytest.mark.parametrize(
    "loss_on, pick",
    [
        ("assistant", lambda idx, final: idx),
        ("last_turn", lambda idx, final: idx[-1:]),
        ("completion", lambda idx, final: [i for i in idx if i >= final]),
    ],
)
def test_loss_on_modes(smol, loss_on, pick):
    r = Renderer(smol)
    pc = parse_record(
        {
            "prompt": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
            "completion": [{"role": "assistant", "content": "A2"}],
        },
        "prompt_completion",
    )
    convs = [_conv(CONVS[1]), pc]
    for c, ex in zip(convs, r.encode_chats(convs, loss_on)):
        idx = [i for i, m in enumerate(c.messages) if m["role"] == "assistant"]
        expected = [c.messages[i]["content"] + "<|im_end|>" for i in pick(idx, c.final_start)]
        assert _decoded_runs(smol, ex) == expected


def test_loss_on_all_trains_every_token_but_the_first(smol):
    (ex,) = Renderer(smol).encode_chats([_conv(CONVS[1])], "all")
    assert not ex.mask[0] and ex.mask[1:].all()


def test_llama3_template_single_bos_and_eot_in_loss(tiny_llama3):
    tok = tiny_llama3
    r = Renderer(tok)
    assert r.adds_bos  # the tokenizer adds a BOS to plain text, and the template writes one too
    examples = r.encode_chats([_conv(m) for m in CONVS], "assistant")
    for messages, ex in zip(CONVS, examples):
        assert ex.ids[0] == tok.bos_token_id and ex.ids[1] != tok.bos_token_id
        assert int((ex.ids == tok.bos_token_id).sum()) == 1
        # Llama 3's template trims contents; the trained span is content + <|eot_id|>, the header is not trained
        expected = [m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"]
        assert _decoded_runs(tok, ex) == expected
        assert ex.ids.tolist() == list(tok.apply_chat_template(messages, return_dict=False))


def test_bos_added_once_when_template_has_none():
    tok = make_tiny_tokenizer(LLAMA3_NO_BOS_TEMPLATE)
    (ex,) = Renderer(tok).encode_chats([_conv(CONVS[0])], "assistant")
    assert ex.ids[0] == tok.bos_token_id and int((ex.ids == tok.bos_token_id).sum()) == 1
    assert _decoded_runs(tok, ex) == ["4<|eot_id|>"]
    assert ex.prompt_end > 0 and tok.decode(ex.ids[ex.prompt_end : ex.prompt_end + 1].tolist()) == "4"


def test_template_override_replaces_tokenizers_own(smol):
    (ex,) = Renderer(smol, CHATML_TEMPLATE).encode_chats([_conv(CONVS[0])], "assistant")
    text = smol.decode(ex.ids.tolist())
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"  # no default system prompt
    assert _decoded_runs(smol, ex) == ["4<|im_end|>"]


def test_no_template_is_an_error():
    tok = make_tiny_tokenizer(None)
    with pytest.raises(ConfigError, match="no chat template"):
        Renderer(tok).encode_chats([_conv(CONVS[0])], "assistant")
    # an override makes the same tokenizer usable
    (ex,) = Renderer(tok, CHATML_TEMPLATE.replace("im_", "")).encode_chats([_conv(CONVS[0])], "assistant")
    assert ex.trained > 0


def test_inconsistent_template_is_reported_per_record(smol):
    # renders the last message differently: prefixes are not prefixes of the whole conversation
    odd = "{% for m in messages %}{% if loop.last %}<|im_start|>LAST {% endif %}{{ m['content'] }}<|im_end|>{% endfor %}"
    (res,) = Renderer(smol, odd).encode_chats([_conv(CONVS[1])], "assistant")
    assert isinstance(res, str) and "differently" in res
    failing = "{% if messages|length > 2 %}{{ raise_exception('roles must alternate') }}{% endif %}" + CHATML_TEMPLATE
    out = Renderer(smol, failing).encode_chats([_conv(CONVS[0]), _conv(CONVS[1])], "assistant")
    assert not isinstance(out[0], str) and isinstance(out[1], str) and "roles must alternate" in out[1]


def test_text_format_bos_and_eos(smol, tiny_llama3):
    text = parse_record({"text": "the quick brown fox"}, "text")
    (ex,) = Renderer(smol).encode_texts([text])
    assert ex.ids.tolist() == smol("the quick brown fox", add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    assert not ex.mask[0] and ex.mask[1:].all() and ex.prompt_end == -1
    (ex,) = Renderer(tiny_llama3).encode_texts([text])
    plain = tiny_llama3("the quick brown fox", add_special_tokens=False)["input_ids"]
    assert ex.ids.tolist() == [tiny_llama3.bos_token_id] + plain + [tiny_llama3.eos_token_id]


def test_left_truncation_keeps_the_final_completion(smol):
    (ex,) = Renderer(smol).encode_chats([_conv(CONVS[1])], "assistant")
    n = len(ex)
    final_len = n - ex.keep_from
    assert truncate(ex, n, "drop") is ex and truncate(ex, n - 1, "drop") is None
    cut = truncate(ex, final_len + 1, "left")  # the final answer and one token of context
    assert cut is not None and len(cut) == final_len + 1 and cut.keep_from == 1
    assert cut.ids.tolist() == ex.ids[-(final_len + 1) :].tolist()
    assert _decoded_runs(smol, cut) == ["Blue, like the sky.\nOr green.<|im_end|>"]
    assert cut.prompt_end == ex.prompt_end - (n - final_len - 1)
    assert truncate(ex, final_len, "left") is None  # the completion alone does not fit with any context
    # a cut that lands inside an earlier answer drops that answer's first token from the loss
    mid = truncate(ex, n - 2, "left")
    assert not mid.mask[0] and mid.mask[1:].sum() <= ex.mask[2:].sum()
