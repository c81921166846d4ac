"""The method registry and what the trainer asks of a spec without knowing its method: names, specs from config
fields, added inputs, mergeability, file format, and the logical axes of every adapter leaf."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxft import peft as jpeft
from jaxft.errors import ConfigError
from tiny_tree import CONFIG, PARAMS

SPECS = {
    "lora": jpeft.LoraSpec(r=4, target_modules="all-linear", modules_to_save=("lm_head",)),
    "dora": jpeft.DoraSpec(r=4, target_modules=("q_proj", "down_proj")),
    "ia3": jpeft.IA3Spec(),
    "prompt": jpeft.PromptTuningSpec(num_virtual_tokens=3),
    "prefix": jpeft.PrefixTuningSpec(num_virtual_tokens=2),
    "houlsby": jpeft.HoulsbySpec(bottleneck=4),
}


def test_method_names_and_specs_from_fields():
    assert jpeft.method_names() == ("lora", "dora", "ia3", "prompt", "prefix", "houlsby", "bitfit")
    assert jpeft.spec_from_dict("dora", {"r": 16, "alpha": 32}) == jpeft.DoraSpec(r=16, alpha=32.0)
    assert jpeft.spec_from_dict("prefix", {"num_virtual_tokens": 5}) == jpeft.PrefixTuningSpec(5)
    with pytest.raises(ConfigError, match="unknown PEFT method 'lorra'"):
        jpeft.spec_from_dict("lorra", {})
    with pytest.raises(ConfigError, match="method"):
        jpeft.spec_from_dict("lora", {"rank": 8})
    for name, spec in SPECS.items():
        assert jpeft.method_name(spec) == name


@pytest.mark.parametrize("name", list(SPECS))
def test_what_a_spec_adds_and_allows(name):
    spec = SPECS[name]
    adapter = jpeft.init(spec, CONFIG, PARAMS, jax.random.key(0))
    n = jpeft.num_virtual_tokens(spec)
    assert n == {"prompt": 3, "prefix": 2}.get(name, 0)
    assert jpeft.adds_inputs(spec) == (n > 0)
    extra = jpeft.generation_inputs(spec, adapter)
    assert set(extra) == {"prompt": {"virtual_tokens"}, "prefix": {"prefix"}}.get(name, set())
    assert jpeft.mergeable(spec) == (name in ("lora", "dora", "ia3"))
    assert jpeft.peft_loadable(spec) == (name != "houlsby")


@pytest.mark.parametrize("name", list(SPECS))
def test_logical_axes_name_every_dimension_of_every_leaf(name):
    spec = SPECS[name]
    adapter = jpeft.init(spec, CONFIG, PARAMS, jax.random.key(0))
    axes = jpeft.logical_axes(spec, CONFIG, adapter)
    is_axes = lambda v: isinstance(v, tuple) and all(isinstance(a, str) for a in v)
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(adapter)
    for ax, leaf in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(adapter)):
        assert len(ax) == np.ndim(leaf), (ax, np.shape(leaf))
    if name == "lora":
        q = axes["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
        assert q == {"lora_a": ("layers", "embed", "lora_rank"), "lora_b": ("layers", "lora_rank", "q_heads")}
        assert axes["lm_head"]["kernel"] == ("embed", "vocab")
