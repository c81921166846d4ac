"""`python -m jaxft.data inspect`: help, marked example, statistics, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from data_helpers import LLAMA3_TEMPLATE, chat, make_tiny_tokenizer, write_jsonl

import jaxft.data.cli
from jaxft.data.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(tmp_path, model_path, data) -> str:
    path = tmp_path / "train.yaml"
    # the trainer's other sections are ignored by inspect
    path.write_text(yaml.safe_dump({"model": {"path": model_path}, "optim": {"lr": 1e-4}, "train": {"steps": 10}, "data": data}))
    return str(path)


def test_help_answers():
    out = subprocess.run([sys.executable, "-m", "jaxft.data", "inspect", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "CONFIG.yaml" in out.stdout and "dotted.key=value" in out.stdout and "packing efficiency" in out.stdout
    top = subprocess.run([sys.executable, "-m", "jaxft.data", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and "inspect" in top.stdout


def test_inspect_with_a_tokenizer_directory(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    make_tiny_tokenizer(LLAMA3_TEMPLATE).save_pretrained(tok_dir)
    data = write_jsonl(tmp_path / "d.jsonl", [chat("hello world", "it is four"), "{broken", chat("hello world", "it is four")])
    cfg = _config(tmp_path, str(tok_dir), {"train": [data], "seq_len": 32})
    assert main(["inspect", cfg, "data.seq_len=64", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n[[it is four<|eot_id|>]]" in out
    assert "malformed 1 at lines 2 (not valid JSON" in out and "duplicates 1" in out
    assert "seq_len 64" in out and "packing efficiency" in out and "trained" in out


def test_inspect_smollm2_marks_trained_tokens(tmp_path, capsys, monkeypatch, smol):
    # the session's SmolLM2 tokenizer stands in for load_tokenizer("smollm2-135m-instruct") (same call, 10 s saved)
    calls = []
    monkeypatch.setattr(jaxft.data.cli, "load_tokenizer", lambda p: calls.append(p) or smol)
    data = write_jsonl(tmp_path / "d.jsonl", [chat("What is 2+2?", "4"), chat("Hi", "Hello!")])
    cfg = _config(tmp_path, "smollm2-135m-instruct", {"train": [data], "eval_size": 1, "seq_len": 128})
    assert main(["inspect", cfg, "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert calls == ["smollm2-135m-instruct"]
    assert "<|im_start|>assistant\n\x1b[1;32m" in out and "<|im_end|>\x1b[0m\n" in out
    assert "eval: 1 examples" in out and "to eval 1" in out
    assert main(["inspect", cfg, "--split", "eval", "--color", "never"]) == 0
    assert "eval example 0" in capsys.readouterr().out


def test_inspect_errors_are_one_line(tmp_path, capsys):
    cfg = _config(tmp_path, "unused", {"train": [str(tmp_path / "nope.jsonl")]})
    assert main(["inspect", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.train[0]:") and "no such file" in err and "\n" not in err
    no_model = tmp_path / "nomodel.yaml"
    no_model.write_text(yaml.safe_dump({"data": {"train": ["x.jsonl"]}}))
    assert main(["inspect", str(no_model)]) == 2
    assert "model.path is missing" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: no such file (expected a YAML config file)" in capsys.readouterr().err
