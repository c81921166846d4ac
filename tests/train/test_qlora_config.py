"""The QLoRA config schema: `method.type: qlora` (LoRA, rsLoRA or DoRA over an NF4 base) and the `quantize` section,
with one-line errors for what the model or jaxft's NF4 cannot take."""

import dataclasses

import pytest

from jaxft.models.config import LlamaConfig
from jaxft.peft import DoraSpec, LoraSpec
from jaxft.schema import ConfigError
from jaxft.train.config import LINEAR_PROJECTIONS, QuantizeSection, check_quantize, load_config, method_spec

BASE = "configs/quickstart.yaml"


def _tiny(**kw) -> LlamaConfig:
    fields = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    return LlamaConfig(**{**fields, **kw})


def test_qlora_defaults_and_adapters():
    cfg = load_config(BASE, ["method.type=qlora"])
    assert cfg.quantized and cfg.quantization() == QuantizeSection()
    q = cfg.quantize
    assert (q.targets, q.lm_head, q.storage_dtype, q.double_quant, q.block_size) == (
        "all-linear", False, "uint8", True, 64)
    assert q.projections == LINEAR_PROJECTIONS
    assert isinstance(method_spec(cfg.method), LoraSpec) and method_spec(cfg.method).r == 16
    dora = load_config(BASE, ["method.type=qlora", "method.adapter=dora", "quantize.storage_dtype=bfloat16"])
    assert isinstance(method_spec(dora.method), DoraSpec) and dora.quantize.storage_dtype == "bfloat16"
    rs = load_config(BASE, ["method.type=qlora", "method.use_rslora=true", "quantize.targets=[q_proj, v_proj]"])
    assert method_spec(rs.method).use_rslora and rs.quantize.projections == ("q_proj", "v_proj")
    assert load_config(BASE).quantization() is None


@pytest.mark.parametrize("overrides, message", [
    (["method.type=qlora", "method.adapter=ia3"], "method.adapter: 'ia3' cannot train over an NF4 base"),
    (["method.adapter=dora"], "method.adapter: only method.type: qlora takes an adapter"),
    (["quantize.lm_head=true"], "quantize: only method.type: qlora quantises the base"),
    (["method.type=qlora", "quantize.targets=[embed_tokens]"], "quantize.targets: 'embed_tokens' is an embedding"),
    (["method.type=qlora", "quantize.targets=[model.norm]"], "is an embedding or a norm"),
    (["method.type=qlora", "quantize.targets=[lm_head]"], "set by quantize.lm_head"),
    (["method.type=qlora", "quantize.targets=[qproj]"], "'qproj' is not a linear projection"),
    (["method.type=qlora", "quantize.block_size=128"], "quantize.block_size: 128 is not implemented"),
    (["method.type=qlora", "quantize.storage_dtype=int4"], "quantize.storage_dtype"),
    (["method.type=qlora", "quantize.double_qant=true"], "did you mean 'double_quant'"),
])
def test_bad_quantize_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_check_quantize_against_the_model():
    q = QuantizeSection(lm_head=True)
    with pytest.raises(ConfigError, match="quantize.lm_head: true, but this model's output head is tied"):
        check_quantize(q, _tiny())
    check_quantize(q, _tiny(tie_word_embeddings=False))
    check_quantize(None, _tiny())  # not quantised: nothing to check
    with pytest.raises(ConfigError, match="down_proj has 96 input features, not a multiple of the NF4 block"):
        check_quantize(QuantizeSection(), _tiny(intermediate_size=96))
    check_quantize(dataclasses.replace(QuantizeSection(), targets=("q_proj",)), _tiny(intermediate_size=96))
