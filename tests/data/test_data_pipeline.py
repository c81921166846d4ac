"""`prepare` end to end: sources of every kind, formats, filtering counts with line numbers, eval split, mixing,
packing, truncation, and every early error."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from data_helpers import chat, make_tiny_tokenizer, write_jsonl

from jaxft.data import DataConfig, SourceConfig, data_config_from_dict, prepare
from jaxft.data.mixing import mixture_counts, mixture_probabilities
from jaxft.schema import ConfigError


def _cfg(*paths, **kw) -> DataConfig:
    return DataConfig(train=tuple(SourceConfig(p) if isinstance(p, str) else p for p in paths), **kw)


def _decode_trained(tok, ex) -> str:
    return tok.decode(ex.ids[ex.mask].tolist(), skip_special_tokens=False)


def test_jsonl_malformed_duplicates_decontamination(tmp_path, smol):
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            chat("What is 2+2?", "4"),  # line 1
            "{not json",  # line 2
            chat("Name a colour.", "Blue."),  # line 3
            "",  # line 4: blank, not a record
            chat("What is   2+2? ", "4"),  # line 5: duplicate of line 1 after whitespace normalisation
            {"messages": [{"role": "user", "content": "no answer"}]},  # line 6: no assistant
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},  # line 7: content missing
            [1, 2],  # line 8: not an object
            chat("Capital of France?", "Paris."),  # line 9: also in eval
            {"text": "wrong format"},  # line 10: no messages
        ],
    )
    evalf = write_jsonl(tmp_path / "eval.jsonl", [chat("Capital of  France?", "Paris."), chat("Largest planet?", "Jupiter.")])
    p = prepare(_cfg(train, eval=(SourceConfig(evalf),), seq_len=256), smol)
    st, ev = p.stats.sources
    assert (st.read, st.malformed, st.duplicates, st.decontaminated, st.kept) == (9, 5, 1, 1, 2)
    assert st.malformed_numbers == [2, 6, 7, 8, 10] and st.unit == "line"
    assert (ev.read, ev.kept) == (2, 2)
    assert sorted(_decode_trained(smol, e) for e in p.train) == ["4<|im_end|>", "Blue.<|im_end|>"]
    summary = p.stats.summary()
    assert "malformed 5 at lines 2 (not valid JSON" in summary and "duplicates 1" in summary and "decontaminated 1" in summary
    # eval generation: prompt through the generation prompt, reference = final assistant content
    prompts = {ref: smol.decode(ids.tolist()) for ids, ref in p.eval_generation}
    assert set(prompts) == {"Paris.", "Jupiter."}
    assert prompts["Jupiter."].endswith("<|im_start|>user\nLargest planet?<|im_end|>\n<|im_start|>assistant\n")


def test_on_malformed_fail(tmp_path, smol):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("a", "b"), chat("c", "d"), "oops"])
    with pytest.raises(ValueError, match=r"t\.jsonl line 3: not valid JSON.*on_malformed"):
        prepare(_cfg(path, on_malformed="fail"), smol)


def test_formats_through_datasets(tmp_path, smol):
    # prompt/completion in a JSON array file, alpaca in CSV, text in Parquet: all read by HF datasets, format auto
    pc = tmp_path / "pc.json"
    pc.write_text(json.dumps([{"prompt": "Say hi", "completion": "hi"}, {"prompt": "Say bye", "completion": "bye"}]))
    alp = tmp_path / "alpaca.csv"
    pd.DataFrame({"instruction": ["Add", "Reverse"], "input": ["1 and 2", None], "output": ["3", "esrever"]}).to_csv(alp, index=False)
    txt = tmp_path / "text.parquet"
    pd.DataFrame({"text": ["the quick brown fox", "jumps over the dog"]}).to_parquet(txt)
    p = prepare(_cfg(str(pc), str(alp), str(txt), seq_len=128, packing=False), smol)
    fmts = [s.format for s in p.stats.sources]
    assert fmts == ["prompt_completion", "alpaca", "text"]
    assert all(s.unit == "record" for s in p.stats.sources)
    by_source = {i: [e for e in p.train if e.source == i] for i in range(3)}
    assert [_decode_trained(smol, e) for e in by_source[0]] == ["hi<|im_end|>", "bye<|im_end|>"]
    first = smol.decode(by_source[1][0].ids.tolist())
    assert "<|im_start|>user\nAdd\n\n1 and 2<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n" in first
    assert "<|im_start|>user\nReverse<|im_end|>" in smol.decode(by_source[1][1].ids.tolist())
    doc = by_source[2][0]
    assert smol.decode(doc.ids.tolist()) == "the quick brown fox<|im_end|>" and doc.mask[1:].all()
    assert p.stats.train.rows == 6 and len(p.train_rows) == 6  # packing: false -> one example per row


def test_truncation_policies(tmp_path, smol):
    long_prompt = "word " * 200
    path = write_jsonl(tmp_path / "t.jsonl", [chat(long_prompt, "short answer"), chat("hi", "ok"), chat("q", "a " * 300)])
    with pytest.raises(ConfigError, match="no usable record"):
        prepare(_cfg(path, seq_len=16), smol)
    drop = prepare(_cfg(path, seq_len=64), smol).stats.sources[0]
    assert (drop.too_long, drop.truncated, drop.kept) == (2, 0, 1)
    p = prepare(_cfg(path, seq_len=64, truncation="left"), smol)
    left = p.stats.sources[0]
    assert (left.too_long, left.truncated, left.kept) == (1, 1, 2)
    cut = max(p.train, key=len)
    assert len(cut) == 64 and _decode_trained(smol, cut) == "short answer<|im_end|>"


def test_eval_carve_is_deterministic_and_disjoint(tmp_path, smol):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(40)])
    a = prepare(_cfg(path, eval_size=7, seed=3), smol)
    b = prepare(_cfg(path, eval_size=7, seed=3), smol)
    c = prepare(_cfg(path, eval_fraction=0.25, seed=4), smol)
    assert [e.number for e in a.eval] == [e.number for e in b.eval] and len(a.eval) == 7
    assert not {e.number for e in a.eval} & {e.number for e in a.train}
    assert len(a.train) == 33 and a.stats.sources[0].to_eval == 7
    assert a.stats.records_read == 40 and a.stats.kept == 40  # carved records are not read twice
    assert len(c.eval) == 10 and {e.number for e in c.eval} != {e.number for e in a.eval}
    assert sorted(ref for _, ref in a.eval_generation) == sorted(f"answer {e.number - 1}" for e in a.eval)
    batches = list(a.eval_batches(3))
    assert len(batches) == -(-len(a.eval_rows) // 3)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == a.stats.eval.trained_tokens
    with pytest.raises(ConfigError, match="eval_size=40.*only 40 usable"):
        prepare(_cfg(path, eval_size=40), smol)


def test_mixing_and_packing_through_prepare(tmp_path, smol):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"alpha {i}", f"A{i}") for i in range(12)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(f"beta {i}", f"B{i}") for i in range(30)])
    cfg = _cfg(SourceConfig(a, weight=2.0), SourceConfig(b, weight=1.0), seq_len=128)
    p = prepare(cfg, smol)
    expected = mixture_counts([12, 30], mixture_probabilities([12, 30], [2, 1], "weight"))
    assert [s.drawn for s in p.stats.sources] == expected == [28, 14]
    assert [sum(e.source == i for e in p.train) for i in (0, 1)] == expected
    # every drawn example sits in exactly one row, rows fit, efficiency as reported
    placed = sorted(k for row in p.train_rows for k in row)
    assert placed == list(range(len(p.train)))
    assert all(sum(len(p.train[k]) for k in row) <= 128 for row in p.train_rows)
    tokens = sum(len(e) for e in p.train)
    assert p.stats.train.efficiency == pytest.approx(tokens / (len(p.train_rows) * 128))
    assert f"packing efficiency {p.stats.train.efficiency:.1%}" in p.stats.summary()
    t = prepare(_cfg(a, b, mixing="temperature", temperature=0.0001, seq_len=128), smol)
    assert [s.drawn for s in t.stats.sources] == [21, 21]  # T -> 0: uniform over sources


def test_train_batches_resume(tmp_path, smol):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i} " * (i % 7 + 1), f"a{i}") for i in range(50)])
    p = prepare(_cfg(path, seq_len=64), smol)
    it = p.train_batches(batch_size=2, seed=1)
    for _ in range(3):
        next(it)
    state = it.state()
    want = [next(it) for _ in range(4)]
    again = p.train_batches(batch_size=2, seed=1)
    again.restore(state)
    for w in want:
        got = next(again)
        assert all(np.array_equal(got[k], w[k]) for k in w)
    b = want[0]
    starts = (b["positions"] == 0) & (b["segment_ids"] > 0)
    assert not b["loss_mask"][starts].any() and not b["loss_mask"][b["segment_ids"] == 0].any()


def test_early_errors(tmp_path, smol):
    good = write_jsonl(tmp_path / "good.jsonl", [chat("a", "b")])
    with pytest.raises(ConfigError, match=r"data.train\[1\]: .*missing.jsonl: no such file"):
        prepare(_cfg(good, str(tmp_path / "missing.jsonl")), smol)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(ConfigError, match="cannot detect the format.*answer.*question"):
        prepare(_cfg(odd), smol)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["nope", {"messages": []}])
    with pytest.raises(ConfigError, match=r"no usable record \(2 read, 2 malformed\)"):
        prepare(_cfg(bad), smol)
    with pytest.raises(ConfigError, match="no chat template"):
        prepare(_cfg(good), make_tiny_tokenizer(None))
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(ConfigError, match=r"cannot read \.txt"):
        prepare(_cfg(str(notes)), smol)
    with pytest.raises(ConfigError, match="format.*'chatml' is not one of"):
        data_config_from_dict({"train": [{"path": good, "format": "chatml"}]})
    with pytest.raises(ConfigError, match="both set"):
        data_config_from_dict({"train": [good], "eval": [good], "eval_size": 3})
    with pytest.raises(ConfigError, match="eval_fraction"):
        data_config_from_dict({"train": [good], "eval_fraction": 1.5})
    with pytest.raises(ConfigError, match="weights are not used"):
        data_config_from_dict({"train": [{"path": good, "weight": 2}], "mixing": "temperature"})
    with pytest.raises(ConfigError, match="unknown key 'seqlen'; did you mean 'seq_len'"):
        data_config_from_dict({"train": [good], "seqlen": 5})


def test_config_accepts_plain_paths():
    cfg = data_config_from_dict({"train": ["a.jsonl", {"path": "b.parquet", "weight": 2}], "eval": "c.jsonl", "seq_len": 64})
    assert cfg.train == (SourceConfig("a.jsonl"), SourceConfig("b.parquet", weight=2.0))
    assert cfg.eval == (SourceConfig("c.jsonl"),) and cfg.seq_len == 64


def test_thousands_of_chats_prepare_in_seconds(tmp_path, smol):
    path = write_jsonl(
        tmp_path / "big.jsonl",
        [
            {"messages": [
                {"role": "user", "content": f"Question {i}: explain item {i} in a sentence or two."},
                {"role": "assistant", "content": f"Item {i} is explained here in a short sentence. " * 3},
                {"role": "user", "content": "And more?"},
                {"role": "assistant", "content": f"More about {i}."},
            ]}
            for i in range(2000)
        ],
    )
    t0 = time.perf_counter()
    p = prepare(_cfg(path, seq_len=512), smol)
    elapsed = time.perf_counter() - t0
    assert len(p.train) == 2000
    assert elapsed < 30, f"prepare took {elapsed:.1f} s for 2000 two-turn chats"
