"""`method.type: qlora` through `python -m jaxft.train` on a tiny random Llama with SmolLM2's vocabulary (hidden 64:
NF4 needs input widths that are multiples of 64): the base loads quantised, the run trains and exports a peft
adapter and a dequantised merge whose logits match the quantised-base model's; the refusals are one line, before
any weight is read or trained."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from hf_models import write_arithmetic_chats, write_tiny_smollm_vocab_model
from jaxft.train.__main__ import main

# The merged export against the quantised-base model (jaxft, fp32): 2.7e-7 max relative logit error measured;
# bound 1e-5 (37x: the export's own default tolerance for fp32 weights is 1e-4).
MERGED_RTOL = 1e-5


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora_run")
    os.makedirs(tmp / "model")
    write_tiny_smollm_vocab_model(str(tmp / "model"), hidden=64, intermediate=128)
    write_arithmetic_chats(str(tmp / "train.jsonl"), 40, 7)
    return tmp


def _yaml(tmp, name: str, **sections) -> str:
    cfg = {"output_dir": str(tmp / name), "model": {"path": str(tmp / "model")},
           "data": {"train": [str(tmp / "train.jsonl")], "eval_size": 8, "seq_len": 64, "packing": True},
           "method": {"type": "qlora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
           "optim": {"lr": 1e-2, "warmup_steps": 1},
           "train": {"steps": 3, "batch_size": 2, "log_every": 1, "report_to": "none"},
           "eval": {"generate": 0, "batch_size": 4},
           "export": {"adapter": True, "merged": True, "verify": "auto"}}
    for k, v in sections.items():
        cfg[k] = dict(cfg.get(k, {}), **v)
    p = str(tmp / f"{name}.yaml")
    with open(p, "w") as f:
        yaml.safe_dump(cfg, f)
    return p


def test_lm_head_on_a_tied_model_is_refused_before_loading(tmp, capsys):
    code = main([_yaml(tmp, "tied_head", quantize={"lm_head": True})])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and any("quantize.lm_head: true, but this model's output head is tied" in ln for ln in err)
    assert not os.path.exists(tmp / "tied_head" / "config.yaml")  # nothing claimed


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_qlora_trains_and_exports(tmp, storage):
    name = f"run_{storage}"
    assert main([_yaml(tmp, name, quantize={"storage_dtype": storage})]) == 0
    with open(tmp / name / "summary.json") as f:
        s = json.load(f)
    assert s["method"] == "qlora" and s["complete"]
    assert s["merged verify (rel. err)"] < MERGED_RTOL and s["merged drift vs NF4 base (rel.)"] < MERGED_RTOL
    assert s["adapter verify (rel. err)"] < MERGED_RTOL  # peft on the dequantised NF4 base: fp32 rounding only
    with open(tmp / name / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "LORA"
