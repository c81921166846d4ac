"""`python -m jaxft.train`: one-line errors (exit 2, no traceback), `--check`, `--help-config`, and "did you mean"."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from jaxft.train.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, cfg: dict, name="run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _jsonl(path, n=4) -> str:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                             {"role": "assistant", "content": f"a{i}"}]}) + "\n")
    return str(path)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_broken_model_config_is_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "vocab_size": 10, "num_hidden_layers": 1, '
                                       '"num_attention_heads": 2, "intermediate_size": 16}')
    cfg = _write(tmp_path, {"output_dir": str(tmp_path / "out"), "model": {"path": str(model)},
                            "data": {"train": [_jsonl(tmp_path / "d.jsonl")]}})
    # before: KeyError: 'hidden_size' with a traceback
    assert main([cfg]) == 2
    err = _err(capsys)
    assert f"{model / 'config.json'}: field 'hidden_size' is missing" in err
