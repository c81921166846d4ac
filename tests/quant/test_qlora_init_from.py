"""`method.init_from` under `method.type: qlora` (`jaxft.train.preflight.resolve_init_from`): a LoRA or DoRA adapter
saved by a qlora run or by a lora/dora run (the same peft files) continues in a qlora run when its type matches `method.adapter`
(or sets it), the recorded method section says `type: qlora, adapter: <file's>`; a mismatch, or an adapter qlora
cannot train over an NF4 base, is one line before any weight is read. A LoRA saved by a qlora run also continues
in a lora run. Through the trainer's stages: a tiny qlora run starts from the saved adapter, over an NF4 base."""

from __future__ import annotations

import os
import warnings

import jax
import numpy as np
import pytest

import jaxft
from jaxft import peft, quant
from jaxft.models.config import LlamaConfig
from jaxft.models.params import abstract_params
from jaxft.schema import ConfigError
from jaxft.train import build, prepare
from jaxft.train.config import method_spec, parse_config
from jaxft.train.preflight import resolve_init_from
from hf_models import write_arithmetic_chats, write_tiny_smollm_vocab_model

CONFIG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
METHODS = {"lora": {"type": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
           "dora": {"type": "dora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           "ia3": {"type": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                   "feedforward_modules": ["down_proj"]}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Adapter directories `<kind>` in peft's format. A file does not depend on the base it was trained over (dense
    or NF4: the same tensors and config; the end-to-end test below saves one over an NF4 base)."""
    tmp = tmp_path_factory.mktemp("qlora_init_from")
    params = abstract_params(CONFIG)
    out = {"tmp": tmp}
    for kind, method in METHODS.items():
        spec = method_spec(method)
        adapter = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), jax.eval_shape(
            lambda: peft.init(spec, CONFIG, params, jax.random.key(1))))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*vLLM will not serve")
            peft.save_adapter(spec, adapter, str(tmp / kind), CONFIG)
        out[kind] = str(tmp / kind)
    return out


def _resolve(files, **method):
    cfg = parse_config({"output_dir": str(files["tmp"] / "run"), "model": {"path": "unused"},
                        "data": {"train": ["unused.jsonl"]}, "method": method})
    return resolve_init_from(cfg, CONFIG)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_matching_adapter_continues_in_a_qlora_run(files, kind):
    d = files[kind]
    file_spec, _ = peft.load_adapter(d, CONFIG)
    for method in ({"type": "qlora", "init_from": d}, {"type": "qlora", "adapter": kind, "r": 4, "init_from": d}):
        cfg, spec = _resolve(files, **method)
        assert spec == file_spec
        assert cfg.quantized and cfg.method["type"] == "qlora" and cfg.method["adapter"] == kind
        assert cfg.method["r"] == 4 and cfg.method["init_from"] == d
        assert method_spec(cfg.method) == file_spec  # what config.yaml records builds the same adapter


def test_lora_of_a_qlora_run_continues_in_a_lora_run(files):
    cfg, spec = _resolve(files, type="lora", init_from=files["lora"])
    assert cfg.method["type"] == "lora" and not cfg.quantized and "adapter" not in cfg.method


@pytest.mark.parametrize("method, says", [
    ({"adapter": "lora", "file": "dora"}, "holds a dora adapter that the method section contradicts: adapter "
                                                "lora (file: dora)"),
    ({"adapter": "dora", "file": "lora"}, "adapter dora (file: lora)"),
    ({"r": 8, "file": "lora"}, "r 8 (file: 4)"),
    ({"file": "ia3"}, "holds a ia3 adapter, and method.type: qlora trains lora or dora over the NF4 base; "
                            "continue it with method.type: ia3"),
])
def test_mismatch_is_one_line(files, method, says):
    d = files[method.pop("file")]
    with pytest.raises(ConfigError) as e:
        _resolve(files, type="qlora", init_from=d, **method)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"method.init_from: {d} ") and says in line, line


@pytest.mark.slow  # the tiny model's SmolLM2 tokenizer is read from the GGUF twice, the base quantised twice
def test_qlora_run_continues_a_saved_adapter(tmp_path):
    """The trainer's stages on a tiny model: `prepare` + `build` of a qlora run whose method section is only
    `{type: qlora, init_from}` start from the file's adapter, saved over the NF4 base with every factor moved (a fresh
    adapter has B = 0), over an NF4 base, and the recorded method is the file's under type qlora."""
    os.makedirs(tmp_path / "model")
    write_tiny_smollm_vocab_model(str(tmp_path / "model"), hidden=64, intermediate=128)
    write_arithmetic_chats(str(tmp_path / "train.jsonl"), 8, 5)
    config, base = jaxft.load_pretrained(str(tmp_path / "model"), quantize=quant.QuantPlan())
    spec = method_spec(METHODS["lora"])
    rng = np.random.default_rng(0)
    adapter = jax.tree.map(lambda x: x + 0.5 * rng.standard_normal(x.shape, np.float32),
                           peft.init(spec, config, base, jax.random.key(1)))
    saved = str(tmp_path / "saved")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*vLLM will not serve")
        peft.save_adapter(spec, adapter, saved, config)
    cfg = parse_config({"output_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path / "model")},
                        "data": {"train": [str(tmp_path / "train.jsonl")], "seq_len": 64},
                        "method": {"type": "qlora", "init_from": saved},
                        "train": {"steps": 1, "batch_size": 2, "report_to": "none"}})
    prep = prepare(cfg)
    assert prep.cfg.method["type"] == "qlora" and prep.cfg.method["adapter"] == "lora" and prep.cfg.method["r"] == 4
    session = build(prep)
    assert session.model.spec == peft.load_adapter(saved, config)[0] and quant.nf4_leaves(session.frozen)
    assert jax.tree.structure(session.trainable) == jax.tree.structure(adapter)
    for got, want in zip(jax.tree.leaves(session.trainable), jax.tree.leaves(adapter)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
