"""Import of transformers' bitsandbytes 4-bit NF4 checkpoints (transformers 5 + bitsandbytes 0.50.2, on CPU):
a tiny random Llama quantised by transformers (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`)
and saved; `jaxft.load_pretrained` of that directory gives NF4Tensor leaves that dequantise to bitsandbytes' own
values bit for bit (its device-independent `dequantize_4bit`, `hf_models.bnb_dequantize`) and logits equal to
transformers' bnb model's in fp32 (`hf_models.bnb_fp32`: no AVX512-BF16 repacking). Bad input (fp4, other block sizes,
dtypes, maps, other quantisation methods) is refused by name before any weight is converted."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.errors import FileFormatError, UnsupportedConfigError
from jaxft.quant import NF4Tensor, dequantize
from hf_models import bnb_dequantize, bnb_fp32
from optional_import import optional

torch = optional("torch")
transformers = optional("transformers")
safetensors_torch = optional("safetensors.torch")

# name -> (intermediate size, double quant, quant storage): 192 is three NF4 blocks of 64 along down_proj's input
# (a ragged last packing chunk); 160 is not a multiple of 64, so down_proj is dequantised to a dense leaf
CASES = {"double_quant": (192, True, "uint8"), "single_quant": (160, False, "uint8"),
         "bf16_storage": (192, True, "bfloat16")}


def _quantised(d, seed: int, intermediate: int, double_quant: bool, storage: str):
    """Write a tiny random Llama (untied head, GQA) to `d/dense`, quantise it with transformers' bitsandbytes
    integration and save it to `d/bnb`; returns (bnb dir, the quantised transformers model)."""
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=intermediate,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, initializer_range=0.05, tie_word_embeddings=False)
    torch.manual_seed(seed)
    dense = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # random norms so every parameter matters
        for name, p in dense.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    dense.save_pretrained(d / "dense")
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32,
                                         bnb_4bit_quant_storage=getattr(torch, storage))
    model = transformers.AutoModelForCausalLM.from_pretrained(d / "dense", quantization_config=qc,
                                                              dtype=torch.float32, device_map="cpu",
                                                              attn_implementation="eager").eval()
    bnb_fp32(model)
    model.save_pretrained(d / "bnb")
    return d / "bnb", model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for i, (name, args) in enumerate(CASES.items()):
        out[name] = _quantised(tmp_path_factory.mktemp(name), i, *args)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_import_is_exact_and_logits_match_transformers(checkpoints, case):
    path, model = checkpoints[case]
    intermediate, double_quant, _ = CASES[case]
    config, params = jaxft.load_pretrained(str(path))
    layers = params["model"]["layers"]
    # every quantised linear: an NF4Tensor of the dense shape, dequantising to bitsandbytes' values bit for bit
    for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            leaf = layers[group][name]["kernel"]
            dense = np.asarray(dequantize(leaf) if isinstance(leaf, NF4Tensor) else leaf)
            for i in range(config.num_hidden_layers):
                mod = getattr(getattr(model.model.layers[i], group), name)
                ref = bnb_dequantize(mod.weight).numpy().T
                if name == "down_proj" and intermediate % 64:  # not NF4Tensor-shaped: exact dense dequantisation
                    assert not isinstance(leaf, NF4Tensor)
                else:
                    assert isinstance(leaf, NF4Tensor) and leaf.double_quant == double_quant
                    assert leaf.shape == (config.num_hidden_layers, *ref.shape) and leaf.dtype == jnp.float32
                np.testing.assert_array_equal(dense[i].view(np.uint32), ref.view(np.uint32))
    assert not isinstance(params["lm_head"]["kernel"], NF4Tensor)  # bitsandbytes keeps the head dense
    worst = 0.0
    for seed in range(3):
        ids = np.random.default_rng(seed).integers(0, config.vocab_size, (2, 24))
        ref = _logits(model, ids)
        got = np.asarray(jaxft.forward(config, params, jnp.asarray(ids)))
        worst = max(worst, float(np.abs(got - ref).max()))
    # 1e-5 absolute on logits of magnitude ~2: largest measured 1.55e-6 (3 checkpoints x 3 inputs, transformers'
    # eager attention), a 6.5x margin; the weights themselves are bit-exact (above)
    assert worst <= 1e-5, worst


def _rewrite(src, dst, tensors=None, config=None):
    """A copy of checkpoint `src` at `dst` with `tensors(dict) -> dict` applied to its safetensors and
    `config(dict)` to its config.json."""
    shutil.copytree(src, dst)
    if tensors is not None:
        t = safetensors_torch.load_file(str(dst / "model.safetensors"))
        safetensors_torch.save_file(tensors(t), str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        c = json.loads((dst / "config.json").read_text())
        config(c)
        (dst / "config.json").write_text(json.dumps(c))
    return str(dst)


_Q = "model.layers.1.mlp.up_proj.weight"


def _state(edit):
    def f(t):
        s = json.loads(bytes(t[_Q + ".quant_state.bitsandbytes__nf4"].numpy()).decode())
        edit(s)
        t[_Q + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(s).encode()), dtype=torch.uint8)
        return t
    return f


def _rename_state(t):
    t[_Q + ".quant_state.bitsandbytes__fp4"] = t.pop(_Q + ".quant_state.bitsandbytes__nf4")
    return t


def _bump_map(t):
    t[_Q + ".quant_map"] = t[_Q + ".quant_map"] * 1.0000001
    return t


def _int_norm(t):
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.uint8)
    return t


def _drop_absmax(t):
    del t[_Q + ".absmax"]
    return t


BAD = {
    "fp4 in config": (None, lambda c: c["quantization_config"].update(bnb_4bit_quant_type="fp4"),
                      UnsupportedConfigError, "bnb_4bit_quant_type is 'fp4'"),
    "8-bit": (None, lambda c: c["quantization_config"].update(load_in_8bit=True, _load_in_8bit=True),
              UnsupportedConfigError, "load_in_8bit"),
    "gptq": (None, lambda c: c["quantization_config"].update(quant_method="gptq"), UnsupportedConfigError,
             "quant_method 'gptq'"),
    "fp4 state": (_rename_state, None, UnsupportedConfigError, "fp4-quantised"),
    "block 128": (_state(lambda s: s.update(blocksize=128)), None, UnsupportedConfigError, "blocks of 128"),
    "nested block": (_state(lambda s: s.update(nested_blocksize=128)), None, UnsupportedConfigError,
                     "nested blocks of 128"),
    "dtype": (_state(lambda s: s.update(dtype="float64")), None, UnsupportedConfigError, "dtype 'float64'"),
    "quant_map": (_bump_map, None, UnsupportedConfigError, "quant_map other than"),
    "shape": (_state(lambda s: s.update(shape=[128, 256])), None, FileFormatError, "holds 12288 bytes of codes"),
    "missing absmax": (_drop_absmax, None, FileFormatError, "absmax' is missing"),
    "integer dense weight": (_int_norm, None, FileFormatError, "'model.norm.weight' has dtype U8"),
    "no quantization_config": (None, lambda c: c.pop("quantization_config"), FileFormatError,
                               "bitsandbytes 4-bit tensors .* no quantization_config"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_checkpoints_refused_by_name(checkpoints, tmp_path, bad):
    tensors, config, err, match = BAD[bad]
    path = _rewrite(checkpoints["double_quant"][0], tmp_path / "bad", tensors, config)
    with pytest.raises(err, match=match) as e:
        jaxft.load_pretrained(path)
    assert "\n" not in str(e.value) and path in str(e.value)


def test_sharded_load_places_the_checkpoint(checkpoints):
    """With shardings (here a one-device mesh: the multi-device placement is `_place_host`'s
    `make_array_from_callback`), the checkpoint loads as it does without, every field on its sharding."""
    from jax.sharding import Mesh, NamedSharding

    from jaxft import parallel, quant
    from jaxft.parallel.rules import shard_counts

    path = str(checkpoints["double_quant"][0])
    config, plain = jaxft.load_pretrained(path)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), parallel.MESH_AXES)
    axes = quant.tree_axes(jaxft.models.params.logical_axes(config), plain, shard_counts("fsdp", mesh))
    shardings = parallel.param_shardings(axes, "fsdp", mesh)
    _, placed = jaxft.load_pretrained(path, shardings=shardings)
    assert jax.tree.structure(placed) == jax.tree.structure(plain)
    for a, b, s in zip(jax.tree.leaves(placed), jax.tree.leaves(plain), jax.tree.leaves(shardings)):
        assert a.sharding == s and np.array_equal(np.asarray(a), np.asarray(b))
