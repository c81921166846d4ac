"""`python -m jaxft.train`: one-line errors (exit 2, no traceback), `--check`, `--help-config`, and "did you mean"."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from jaxft.train.__main__ import main
from optional_import import needs_gguf_tokenizer

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
    assert f"{model / 'config.json'}: required field 'hidden_size' is missing" in err


# ---- the config reference and "did you mean" -------------------------------------------------------------------

from jaxft.schema import ALIASES, ConfigError, suggest  # noqa: E402
from jaxft.train import reference  # noqa: E402
from jaxft.train.config import load_config  # noqa: E402


def test_help_config_lists_every_key():
    out = subprocess.run([sys.executable, "-m", "jaxft.train", "--help-config"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for key in ("optim.lr", "data.on_malformed", "train.grad_accum", "method.r", "export.verify_layers"):
        assert f"  {key}  (" in out.stdout, key
    assert "data.on_malformed  ('skip' or 'fail', default skip)" in out.stdout
    helped = subprocess.run([sys.executable, "-m", "jaxft.train", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert "--help-config" in helped.stdout


def test_every_alias_points_at_a_key_that_exists():
    keys = set(reference.all_keys())
    stale = {alias: target for alias, (target, _) in ALIASES.items() if target not in keys}
    assert not stale, f"ALIASES point at keys the config no longer has: {stale}"


HF_AND_TRL_NAMES = ["learning_rate", "per_device_train_batch_size", "num_train_epochs", "gradient_accumulation_steps",
                    "warmup_ratio", "lr_scheduler_type", "weight_decay", "max_grad_norm", "logging_steps",
                    "eval_steps", "save_steps", "save_total_limit", "seed", "output_dir", "bf16", "lora_r",
                    "lora_alpha", "lora_dropout", "max_seq_length", "target_modules", "packing", "dataset_text_field"]


@pytest.mark.parametrize("name", HF_AND_TRL_NAMES)
def test_names_from_hf_and_trl_map_to_jaxft_keys(name):
    assert name in ALIASES
    target = ALIASES[name][0]
    # written in a section where jaxft does not have it, the message names jaxft's key
    where = "eval" if not target.startswith("eval.") else "optim"
    assert f"did you mean '{target}'?" in suggest(name, where, ["generate", "batch_size"])


@pytest.mark.parametrize("override, expected", [
    # before: "did you mean 'min_lr_ratio'?"
    ("optim.lerning_rate=1e-4", "did you mean 'optim.lr'?"),
    ("optim.learning_rate=1e-4", "did you mean 'optim.lr'?"),
    ("train.per_device_train_batch_size=4", "did you mean 'train.batch_size'?"),
    ("train.num_train_epochs=3", "did you mean 'train.epochs'?"),
    ("train.output_dir=x", "did you mean 'output_dir'? (at the top level)"),
    ("method.lora_r=4", "did you mean 'method.r'?"),
    ("lora_alpha=32", "did you mean 'method.alpha'?"),
    ("train.target_modules=[q_proj]", "did you mean 'method.target_modules'?"),
    ("data.max_seq_length=512", "did you mean 'data.seq_len'?"),
    ("train.warmup_ratio=0.1", "did you mean 'optim.warmup_ratio'?"),
    ("optim.path=x", "'path' belongs elsewhere: data.eval[].path or data.train[].path or model.path"),
    ("optim.lrr=1", "did you mean 'lr'?"),
])
def test_did_you_mean_ranks_by_meaning(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", [override])
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg
    # an error from a command-line override blames the override, not the YAML file (before: "configs/quickstart.yaml:")
    assert msg.startswith(f"override '{override}': "), msg


def test_errors_from_the_yaml_blame_the_yaml(tmp_path):
    cfg = {"output_dir": str(tmp_path / "o"), "data": {"train": ["x.jsonl"]}, "optim": {"lerning_rate": 1e-4}}
    path = _write(tmp_path, cfg)
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.steps=3"])
    assert str(e.value).startswith(f"{path}: optim: unknown key 'lerning_rate'; did you mean 'optim.lr'?")
    with pytest.raises(ConfigError) as e:  # a value error in a key the override set
        load_config(path, ["optim.lerning_rate=1", "optim={lr: -1}"])
    assert str(e.value).startswith("override 'optim={lr: -1}': optim.lr: must be > 0"), str(e.value)


# ---- --check reads the data without weights or a tokenizer ---------------------------------------------------------


def _check_config(tmp_path, model: str | None = None, **data) -> str:
    return _write(tmp_path, {"output_dir": str(tmp_path / "out"), "model": {"path": model or str(tmp_path / "no-model")},
                             "data": data}, name="check.yaml")


@needs_gguf_tokenizer  # --check reads the embedded model's tokenizer
def test_check_reads_the_data(tmp_path, capsys):
    good = _jsonl(tmp_path / "d.jsonl", n=6)
    # the data is read first (no tokenizer), then the trainer's checks read the model's config and tokenizer, no weights
    assert main([_check_config(tmp_path, "smollm2-135m-instruct", train=[good], eval_size=2), "--check"]) == 0
    out = capsys.readouterr().out
    assert "data: 4 train and 2 eval records from 1 sources, 0 malformed" in out
    assert "valid: lora on smollm2-135m-instruct" in out and not os.path.exists(tmp_path / "out")


def test_check_refuses_a_missing_model(tmp_path, capsys):
    good = _jsonl(tmp_path / "d.jsonl", n=6)
    assert main([_check_config(tmp_path, train=[good], eval_size=2), "--check"]) == 2
    assert f"{tmp_path}/no-model: no such file or directory" in _err(capsys)


@pytest.mark.parametrize("data, expected", [
    # before: each of these printed "valid" and exit 0; the run failed later, after loading the model
    (lambda t: {"train": [str(t / "missing.jsonl")]}, "data.train[0]: {t}/missing.jsonl: no such file"),
    (lambda t: {"train": [_jsonl(t / "d.jsonl", n=3)], "eval_size": 3},
     "data.eval_size=3: the train sources hold only 3 usable records"),
    (lambda t: {"train": [str(t / "latin1.jsonl")]}, "data.train[0]: {t}/latin1.jsonl line 1 column 14: byte 0xe9"),
    (lambda t: {"train": [str(t / "empty.jsonl")]}, "data.train[0]: {t}/empty.jsonl: is empty"),
    (lambda t: {"train": [_jsonl(t / "d.jsonl", n=3)], "eval": [_jsonl(t / "e.jsonl", n=3)]},
     "data.train[0]: {t}/d.jsonl: no usable record after filtering (3 read, 0 malformed, 0 duplicates, "
     "3 decontaminated"),
])
def test_check_catches_data_problems(tmp_path, capsys, data, expected):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    assert main([_check_config(tmp_path, **data(tmp_path)), "--check"]) == 2
    assert expected.format(t=tmp_path) in _err(capsys)
