"""Read Llama-family GGUF files (llama.cpp's format): config from the metadata, tensors dequantised with `gguf`.

llama.cpp stores the q/k projections of `llama`-architecture models with the rows of each head interleaved for its
RoPE layout; they are permuted back to transformers' rotate-half layout here (as transformers' GGUF loader does).
"""

from __future__ import annotations

import os
import re
import numpy as np

from jaxft.errors import FileFormatError, UnsupportedConfigError
from jaxft.io.stored import StoredTensor
from jaxft.models.config import LlamaConfig, RopeScaling

_ARCHS = {"llama": "llama", "qwen2": "qwen2"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def open_gguf(path: str):
    """A `gguf.GGUFReader` with a one-line error for a missing, truncated or foreign file."""
    from gguf import GGUFReader

    if not os.path.isfile(path):
        what = "is a directory, not" if os.path.isdir(path) else "no such file; expected"
        raise FileFormatError(f"{path}: {what} a GGUF model file; check the path")
    if os.path.getsize(path) == 0:
        raise FileFormatError(f"{path}: is empty (0 bytes); download the GGUF file again")
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct.error/IndexError/KeyError on damaged files
        raise FileFormatError(f"{path}: not a readable GGUF file (truncated or corrupt: {type(e).__name__}: {e}); "
                              "download it again") from None


_MISSING = object()


def _field(reader, key: str, default=_MISSING, path: str = "", kind=None):
    """The metadata value `key`; without a `default`, a missing key is a `FileFormatError` naming it. `kind`
    (int, float) converts the value, and a value it cannot convert is an error naming the key."""
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise FileFormatError(f"{path}: GGUF metadata '{key}' is missing; the file was not written by a "
                                  "Llama-family converter (llama.cpp convert_hf_to_gguf.py writes it)")
        return default
    value = f.contents()
    if kind is not None:
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise FileFormatError(f"{path}: GGUF metadata '{key}' is {value!r}, expected a number") from None
    return value


def config_from_gguf(reader, path: str = "") -> LlamaConfig:
    """The `LlamaConfig` described by a GGUF file's metadata; a missing or non-numeric metadata key is a
    `FileFormatError` naming it, a feature jaxft does not implement an `UnsupportedConfigError`, both starting
    with `path`."""
    try:
        return _config_from_gguf(reader, path)
    except UnsupportedConfigError as e:
        if str(e).startswith(f"{path}: "):
            raise
        raise UnsupportedConfigError(f"{path}: {e}") from None


def _config_from_gguf(reader, path: str) -> LlamaConfig:
    arch = _field(reader, "general.architecture", path=path)
    if arch not in _ARCHS:
        raise UnsupportedConfigError(f"{path}: GGUF architecture '{arch}' is not supported (supported: llama, qwen2)")
    a = arch
    def need(key, kind=int, default=_MISSING):
        return _field(reader, key, default, path, kind)

    heads = need(f"{a}.attention.head_count")
    hidden = need(f"{a}.embedding_length")
    names = {t.name for t in reader.tensors}
    vocab = need(f"{a}.vocab_size", int, None)
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise FileFormatError(f"{path}: GGUF metadata '{a}.vocab_size' and 'tokenizer.ggml.tokens' are both "
                                  "missing, so the vocabulary size is unknown; convert the model again")
        vocab = len(tokens.data)
    rope_type = _field(reader, f"{a}.rope.scaling.type", "none", path)
    if "rope_freqs.weight" in names or rope_type not in ("none", "linear"):
        raise UnsupportedConfigError(f"{path}: GGUF RoPE scaling '{rope_type}' (or a rope_freqs tensor) is not supported")
    scaling = RopeScaling()
    if rope_type == "linear":
        scaling = RopeScaling("linear", factor=need(f"{a}.rope.scaling.factor", float))
    head_dim = need(f"{a}.rope.dimension_count", int, hidden // heads)
    window = need(f"{a}.attention.sliding_window", int, None)
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=need(f"{a}.feed_forward_length"),
        num_hidden_layers=need(f"{a}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=need(f"{a}.attention.head_count_kv", int, heads),
        head_dim=head_dim,
        model_type=_ARCHS[arch],
        max_position_embeddings=need(f"{a}.context_length", int, 2048),
        rms_norm_eps=need(f"{a}.attention.layer_norm_rms_epsilon", float, 1e-6),
        rope_theta=need(f"{a}.rope.freq_base", float, 10000.0),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        sliding_window=window or None,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", None),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", None),
    )


def _interleaved_rows(rows: int, n_head: int) -> np.ndarray:
    """For a q/k projection stored by llama.cpp, the HF row that each stored row holds.

    llama.cpp interleaves the two rotary halves of each head's rows: stored row `h*2d + 2k + t` is HF row
    `h*2d + t*d + k` (transformers' GGUF loader undoes the same permutation)."""
    d = rows // n_head // 2
    return np.arange(rows).reshape(n_head, 2, d).swapaxes(1, 2).reshape(rows)


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a GGUF tensor name (None if it has no HF counterpart)."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def _decoder(qtype, name: str, path: str):
    from gguf import dequantize

    def decode(raw: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(dequantize(raw, qtype), dtype=np.float32)
        except Exception as e:
            raise FileFormatError(f"{path}: cannot dequantise tensor '{name}' ({qtype.name}): {e}") from None

    return decode


def gguf_model(path: str) -> tuple[LlamaConfig, list[StoredTensor]]:
    """The config of a GGUF file and its tensors under their HF names, in HF layout, dequantised to float32 as read.

    The `gguf` reader (whose tokenizer metadata alone takes about 150 MiB for a 49k vocabulary) is dropped before
    this returns; the tensors are read later from their file offsets."""
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    size = os.path.getsize(path)
    out = []
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise FileFormatError(f"{path}: unexpected GGUF tensor '{t.name}' for a {config.model_type} model")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        offset, nbytes = int(t.data_offset), int(t.n_bytes)
        if offset + nbytes > size:
            raise FileFormatError(f"{path}: not a readable GGUF file (truncated or corrupt: tensor '{t.name}' ends "
                             f"at byte {offset + nbytes} of a {size}-byte file)")
        order = None
        if config.model_type == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads
            order = _interleaved_rows(shape[0], heads)
        out.append(StoredTensor(name, shape, path, offset, nbytes, _decoder(t.tensor_type, t.name, path), order))
    return config, out
