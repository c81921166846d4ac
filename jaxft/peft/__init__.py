"""PEFT as functional parameter trees: a typed spec per method, an adapter tree beside the frozen base tree, and
composite weight leaves that compute the method (see DESIGN.md, "weights are types, adapters are trees").

    adapter = peft.init(peft.LoraSpec(r=16, target_modules="all-linear"), config, params, rng)
    loss = lambda adapter: loss_fn(jaxft.forward(config, peft.bind(params, spec, adapter), ids))
    grads = jax.grad(loss)(adapter)                      # the base tree gets no gradient and no optimizer state
    merged = peft.merge(params, spec, adapter)           # plain arrays, the base tree's structure and dtypes
    peft.save_adapter(spec, adapter, "out/", config)     # adapter_config.json + adapter_model.safetensors (peft's)
    spec, adapter = peft.load_adapter("peft_dir/", config)
    spec, adapter = peft.add_weighted_adapter([spec_a, spec_b], [a, b], [0.7, 0.3], "cat", params=params)
"""

from jaxft.peft.arithmetic import add_weighted_adapter
from jaxft.peft.io import load_adapter, peft_loadable, save_adapter
from jaxft.peft.merge import dora_norms, merge, mergeable, unmerge
from jaxft.peft.prompt import adds_inputs, check_unpacked, generation_inputs, num_virtual_tokens, prompt_inputs
from jaxft.peft.registry import method_name, method_names, spec_class, spec_from_dict
from jaxft.peft.serve import VLLM_RANKS, to_lora, vllm_warnings
from jaxft.peft.specs import (BitFitSpec, DoraSpec, HoulsbySpec, IA3Spec, LoraSpec, PrefixTuningSpec,
                              PromptTuningSpec)
from jaxft.peft.tree import bind, init, logical_axes, mask_updates, trainable_mask
from jaxft.peft.types import IA3, Dora, Houlsby, Lora

__all__ = [
    "BitFitSpec", "Dora", "DoraSpec", "Houlsby", "HoulsbySpec", "IA3", "IA3Spec", "Lora", "LoraSpec",
    "PrefixTuningSpec", "PromptTuningSpec", "VLLM_RANKS", "add_weighted_adapter", "adds_inputs", "bind",
    "check_unpacked", "dora_norms", "generation_inputs", "init", "load_adapter", "logical_axes", "mask_updates",
    "merge", "mergeable", "method_name", "method_names", "num_virtual_tokens", "peft_loadable", "prompt_inputs",
    "save_adapter", "spec_class", "spec_from_dict", "to_lora", "trainable_mask", "unmerge", "vllm_warnings",
]
