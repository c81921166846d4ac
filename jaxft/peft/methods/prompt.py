"""Prompt tuning: `num_virtual_tokens` learned embeddings prepended to every row (peft's PROMPT_TUNING).

Adapter: `{'prompt_embeddings': [P, D]}`, N(0, 1) as peft's `nn.Embedding`, or the embeddings of `init_text`'s
tokens (repeated or cut to P). It adds inputs, not weights: `bind` leaves the tree alone and the virtual tokens reach
the model through `jaxft.peft.prompt_inputs` (training, `jaxft.forward`) or `model_inputs` (generation). A row must
hold one segment (packed rows are refused: the virtual tokens are prepended to the whole row).
"""

from __future__ import annotations

import abc
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import ConfigError, FileFormatError
from jaxft.models.llama import segment_positions
from jaxft.peft.peft_fields import check_task, refuse_options
from jaxft.peft.protocol import Method
from jaxft.peft.specs import PromptTuningSpec


def check_unpacked(segment_ids) -> None:
    """Refuse rows holding more than one segment (prompt tuning prepends its tokens to a whole row)."""
    seg = np.asarray(segment_ids)
    first = np.where(seg != 0, seg, seg.max(axis=1, keepdims=True)).min(axis=1)
    packed = np.nonzero(((seg != 0) & (seg != first[:, None])).any(axis=1))[0]
    if packed.size:
        raise ValueError(f"prompt tuning: row {int(packed[0])} of the batch packs more than one segment; prompt "
                         "tuning prepends its virtual tokens to a whole row, so turn packing off for this method")


class VirtualTokens(Method):
    """What prompt and prefix tuning share: no tree change, not mergeable, the peft config of a prompt method."""

    not_mergeable = "adds inputs, not weights; there is nothing to merge"
    peft_type: str

    def bind(self, spec, params, adapter, *, train=False, rng=None):
        return params

    def virtual_tokens(self, spec):
        return spec.num_virtual_tokens

    def reads(self, cfg):
        return cfg.get("peft_type") == self.peft_type

    def spec_from_config(self, cfg, where, tied):
        check_task(cfg, where)
        refuse_options(cfg, {"num_virtual_tokens", "modules_to_save"}, where)
        if cfg.get("modules_to_save"):
            raise ConfigError(f"{where}: modules_to_save with {self.peft_type} is not supported")
        if "num_virtual_tokens" not in cfg:
            raise FileFormatError(f"{where}: missing required field 'num_virtual_tokens' for {self.peft_type}; "
                                  "re-save the adapter")
        return self.spec(num_virtual_tokens=int(cfg["num_virtual_tokens"]))

    def base_fields(self, spec, config) -> dict:
        return {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "inference_mode": True,
                "num_virtual_tokens": spec.num_virtual_tokens, "num_transformer_submodules": 1,
                "num_layers": config.num_hidden_layers}

    @abc.abstractmethod
    def stored_shape(self, spec, config) -> tuple[int, ...]:
        """The shape of peft's `prompt_embeddings` tensor."""

    def check_tensors(self, spec, tensors, config, where) -> np.ndarray:
        if set(tensors) != {"prompt_embeddings"}:
            raise FileFormatError(f"{where}: expected exactly one tensor 'prompt_embeddings', found "
                                  f"{sorted(tensors)}")
        value = tensors["prompt_embeddings"].astype(np.float32)
        shape = self.stored_shape(spec, config)
        if tuple(value.shape) != shape:
            raise FileFormatError(f"{where}: tensor 'prompt_embeddings' has shape {tuple(value.shape)}, the model "
                                  f"expects {shape}")
        return value


class PromptMethod(VirtualTokens):
    name = "prompt"
    spec = PromptTuningSpec
    description = "prompt tuning"
    peft_type = "PROMPT_TUNING"

    def init(self, spec, config, params, rng, *, tokenizer=None, dtype=jnp.float32):
        p = spec.num_virtual_tokens
        if spec.init == "random":
            return {"prompt_embeddings": jax.random.normal(rng, (p, config.hidden_size), jnp.float32).astype(dtype)}
        if tokenizer is None:
            raise ConfigError("PromptTuningSpec(init='text') needs the tokenizer: init(..., tokenizer=tok)")
        ids = list(tokenizer(spec.init_text)["input_ids"])
        if not ids:
            raise ConfigError(f"PromptTuningSpec.init_text: {spec.init_text!r} tokenizes to nothing")
        ids = (ids * math.ceil(p / len(ids)))[:p]  # peft: repeat, then cut to num_virtual_tokens
        table = params["model"]["embed_tokens"]["weight"]
        return {"prompt_embeddings": jnp.take(table, jnp.asarray(ids), axis=0).astype(dtype)}

    def logical_axes(self, spec, config, adapter):
        return {"prompt_embeddings": ("virtual_tokens", "embed")}

    def config_fields(self, spec, config, params):
        return {**self.base_fields(spec, config), "token_dim": config.hidden_size,
                "num_attention_heads": config.num_attention_heads, "prompt_tuning_init": "RANDOM"}

    def stored_shape(self, spec, config):
        return (spec.num_virtual_tokens, config.hidden_size)

    def peft_tensors(self, spec, adapter, config, params):
        return {"prompt_embeddings": np.asarray(adapter["prompt_embeddings"])}

    def load_tensors(self, spec, tensors, config, params, *, files, dtype):
        return {"prompt_embeddings": jnp.asarray(self.check_tensors(spec, tensors, config, files[1]), dtype)}

    def model_inputs(self, spec, adapter):
        return {"virtual_tokens": adapter["prompt_embeddings"]}

    def forward_inputs(self, spec, adapter, input_ids, segment_ids, config, params, dtype):
        if config is None or params is None:
            raise ValueError("prompt_inputs: prompt tuning needs config= and params= to embed the real tokens")
        if not isinstance(segment_ids, jax.core.Tracer):
            check_unpacked(segment_ids)
        b, _ = input_ids.shape
        p = spec.num_virtual_tokens
        prompts = adapter["prompt_embeddings"]
        if prompts.shape != (p, config.hidden_size):
            raise ValueError(f"prompt adapter: prompt_embeddings has shape {tuple(prompts.shape)}, expected "
                             f"{(p, config.hidden_size)}")
        embeds = jnp.take(params["model"]["embed_tokens"]["weight"], input_ids, axis=0).astype(dtype)
        embeds = jnp.concatenate([jnp.broadcast_to(prompts.astype(dtype)[None], (b, p, prompts.shape[1])), embeds],
                                 1)
        row_segment = jnp.max(segment_ids, axis=1, keepdims=True)  # the row's one segment (0: all padding)
        segments = jnp.concatenate([jnp.broadcast_to(row_segment, (b, p)), segment_ids], axis=1)
        positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (b, p)), p + segment_positions(segment_ids)],
                                    1)
        ids = jnp.concatenate([jnp.zeros((b, p), input_ids.dtype), input_ids], axis=1)
        return {"input_ids": ids, "positions": positions.astype(jnp.int32), "segment_ids": segments,
                "embeds": embeds}, p
