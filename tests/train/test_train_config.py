"""The trainer's config schema: every bundled config validates without weights; bad keys get one-line errors."""

import glob
import subprocess
import sys

import yaml

import pytest

from jaxft.schema import ConfigError
from jaxft.train.config import load_config
from jaxft.train.preflight import check_output_dir, saved_config
from optional_import import needs_gguf_tokenizer


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_bundled_configs_validate(path):
    cfg = load_config(path)
    assert cfg.output_dir and cfg.data.train


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'lrr'; did you mean 'lr'?"),
    ("outputdir=x", "unknown key 'outputdir'; did you mean 'output_dir'?"),
    ("method.type=lorra", "did you mean 'lora'?"),
    ("method.rr=4", "unknown key 'rr'"),
    ("train.batch_size=0", "train.batch_size: must be at least 1"),
    ("optim.schedule=exp", "optim.schedule: 'exp' is not one of"),
    ("model.compute_dtype=fp8", "model.compute_dtype"),
    ("data.loss_on=everything", "loss_on"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_overrides_apply():
    cfg = load_config("configs/quickstart.yaml", ["optim.lr=1e-4", "train.steps=7", "method.r=8"])
    assert cfg.optim.lr == 1e-4 and cfg.train.steps == 7 and cfg.method["r"] == 8


@needs_gguf_tokenizer  # --check reads the embedded model's tokenizer
def test_cli_check_and_help(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "jaxft.train", "configs/quickstart.yaml", f"output_dir={tmp_path}/run",
                         "--check"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxft.train", "configs/quickstart.yaml", "train.grad_accum=0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "grad_accum" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "jaxft.train", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "dotted.key=value" in helped.stdout


def test_run_saved_before_new_keys_is_the_same_run(tmp_path):
    """A run directory written before a config section existed (here `parallel`) resumes: the missing keys held
    their defaults then; a real difference is still refused."""
    cfg = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}"])
    old = saved_config(cfg)
    del old["parallel"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert check_output_dir(cfg) is True
    old["optim"]["lr"] = 1.0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="optim.lr"):
        check_output_dir(cfg)


def test_run_saved_before_compute_dtype_auto_is_the_same_run(tmp_path):
    """A run saved when `model.compute_dtype` defaulted to float32 resumes under today's default `auto` on this CPU
    (auto is float32 here); bfloat16 saved is another run."""
    cfg = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}"])
    assert cfg.model.compute_dtype == "auto"
    old = saved_config(cfg)
    old["model"]["compute_dtype"] = "float32"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert check_output_dir(cfg) is True
    old["model"]["compute_dtype"] = "bfloat16"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="model.compute_dtype"):
        check_output_dir(cfg)
