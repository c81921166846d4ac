"""jaxft: fine-tuning for Llama-family language models in JAX.

The public surface for research code:

    config, params = jaxft.load_pretrained("smollm2-135m-instruct")
    logits = jaxft.forward(config, params, input_ids)            # [B, T, V] float32
    jaxft.save_pretrained(config, params, "out/", tokenizer)      # an HF directory transformers loads
"""

from jaxft.errors import ConfigError, FileFormatError, JaxftError, OutputExistsError, UnsupportedConfigError
from jaxft.io.hf import load_config, load_pretrained, save_pretrained
from jaxft.io.tokenizer import load_tokenizer
from jaxft.models.config import LlamaConfig, RopeScaling, from_hf, to_hf
from jaxft.models.llama import KVCache, ModelOptions, forward, forward_cached, hidden_states, init_cache
from jaxft.models.params import abstract_params, init_params, logical_axes, param_specs
from jaxft.ops.linear import Weight, linear, materialize

__all__ = [
    "ConfigError", "FileFormatError", "JaxftError", "KVCache", "LlamaConfig", "ModelOptions", "OutputExistsError",
    "RopeScaling", "UnsupportedConfigError", "Weight", "abstract_params", "forward", "forward_cached", "from_hf",
    "hidden_states", "init_cache", "init_params", "linear", "load_config", "load_pretrained", "load_tokenizer",
    "logical_axes", "materialize", "param_specs", "save_pretrained", "to_hf",
]
