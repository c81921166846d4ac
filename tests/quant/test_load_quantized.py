"""Quantising while loading (`jaxft.load_pretrained(..., quantize=QuantPlan(...))`): the same NF4 tensors as
quantising the loaded dense tree, which leaves are quantised (projections; never embeddings, norms or a tied head;
an untied head only when asked), bfloat16 storage, and the host's peak memory (about the quantised model plus one
dense matrix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxft
from jaxft import quant
from jaxft.models.config import LlamaConfig
from jaxft.models.params import init_params
from jaxft.quant import NF4Tensor


def _model(d: str, tied: bool, hidden=128, intermediate=256, layers=2, vocab=256) -> LlamaConfig:
    c = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, tie_word_embeddings=tied)
    jaxft.save_pretrained(c, init_params(c, jax.random.key(0)), d)
    return c


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("untied"))
    _model(d, tied=False)
    return d


@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantised_load_equals_quantize_of_the_dense_weights(untied, storage, dtype):
    plan = quant.QuantPlan(storage_dtype=storage, double_quant=dtype == "float32")
    _, dense = jaxft.load_pretrained(untied, dtype=dtype)
    _, q = jaxft.load_pretrained(untied, dtype=dtype, quantize=plan)
    names = sorted(quant.nf4_leaves(q))
    assert names == sorted(f"model.layers.{m}.kernel" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"))
    for name in names:
        *path, leaf = name.split(".")
        got, d = q, dense
        for k in (*path, leaf):
            got, d = got[k], d[k]
        # the bitsandbytes-exact reference on the whole stack, given the loader's double-quantisation offset: an
        # fp32 mean whose summation order XLA chooses per program (as torch's differs between CPUs for
        # bitsandbytes: jaxft.quant.bnb_format), checked apart to one part in 1e6
        want = quant.quantize(d, double_quant=plan.double_quant, offset=got.offset)
        assert got.shape == d.shape and got.dtype == d.dtype and got.storage_dtype == storage
        np.testing.assert_array_equal(got.packed(), want.codes)
        np.testing.assert_array_equal(got.absmax, want.absmax)
        if plan.double_quant:
            np.testing.assert_array_equal(got.nested_absmax, want.nested_absmax)
            np.testing.assert_allclose(got.offset, quant.quantize(d).offset, rtol=1e-6)
    # bitsandbytes' default: the head stays dense, loaded as it is
    np.testing.assert_array_equal(q["lm_head"]["kernel"], dense["lm_head"]["kernel"])


def test_lm_head_and_targets(untied, tmp_path):
    _, q = jaxft.load_pretrained(untied, quantize=quant.QuantPlan(projections=("q_proj",), lm_head=True))
    assert sorted(quant.nf4_leaves(q)) == ["lm_head.kernel", "model.layers.self_attn.q_proj.kernel"]
    tied = str(tmp_path / "tied")
    _model(tied, tied=True)
    _, q = jaxft.load_pretrained(tied, quantize=quant.QuantPlan(lm_head=True))
    assert "lm_head" not in q and not isinstance(q["model"]["embed_tokens"]["weight"], NF4Tensor)


_CHILD = r"""
import gc, json, sys
import jax, numpy as np, jaxft
import jaxft.models.params
from jaxft import quant

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

config = jaxft.load_config(sys.argv[1])
plan = quant.QuantPlan()
# compile the quantiser for each matrix shape first: its code is a fixed cost, not a copy of the model
for k, n in {(config.hidden_size, config.hidden_size), (config.hidden_size, config.intermediate_size),
             (config.intermediate_size, config.hidden_size), (config.hidden_size, 2 * config.head_dim)}:
    plan.stack((k, n), np.float32).set(None, np.zeros((k, n), np.float32))
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = kib("VmRSS")
config, params = jaxft.load_pretrained(sys.argv[1], quantize=plan)
jax.block_until_ready(params)
peak = (kib("VmHWM") - before) * 1024
leaves = jax.tree.leaves(params)
stored = sum(x.nbytes for x in leaves)
largest = config.hidden_size * config.intermediate_size * 4  # the largest dense matrix, fp32
dense = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(jaxft.models.params.abstract_params(config)))
print(json.dumps({"peak": peak, "stored": stored, "largest": largest, "dense": dense}))
"""


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux /proc/self/clear_refs to reset the RSS peak")
def test_quantised_load_peak_memory(tmp_path):
    # 4 layers of 1024 x 4096 MLPs: 201 MB of projections in fp32, 29 MB stored as NF4 with double quantisation; the
    # embedding and head (2 x 4 MB) stay dense. One dense matrix is 16 MB.
    d = str(tmp_path / "m")
    _model(d, tied=False, hidden=1024, intermediate=4096, layers=4, vocab=1024)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _CHILD, d], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    # measured (4 runs): peak 88-157 MB = 1.6-2.7x (stored 41 MB + one fp32 matrix 16 MB): besides those, the slab
    # being read (16 MB) and malloc arenas of XLA's threads, which vary run to run. The same model loaded dense in
    # fp32 peaks at 264 MB (a 260 MB model). Bounds: 3.5x, and 0.75 of the dense model.
    assert m["peak"] <= 3.5 * (m["stored"] + m["largest"]), m
    assert m["peak"] <= 0.75 * m["dense"], m


class _Holds:
    """A stand-in for one field's sharding on a process whose devices hold the part `index` of it: all that
    `NF4Stack` asks of a sharding (the addressable shards' indices) before it builds the arrays."""

    def __init__(self, *index: slice):
        self.index = index

    def addressable_devices_indices_map(self, shape):
        return {"device": self.index}


@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_a_process_keeps_only_its_part(storage, double_quant):
    """A process holding layer 1, rows 256:512 and columns 32:64 of a [2, 768, 96] stack quantises and keeps just
    that part, equal to the same part of the whole stack's quantisation (multi-host end to end:
    tests/parallel/test_multihost.py)."""
    w = np.asarray(jax.random.normal(jax.random.key(5), (2, 768, 96)), np.float32)
    plan = quant.QuantPlan(storage_dtype=storage, double_quant=double_quant)
    per = 2 if storage == "uint8" else 4  # rows of `in` per stored row of codes
    layer, rows, cols = slice(1, 2), slice(256, 512), slice(32, 64)
    held = NF4Tensor(_Holds(layer, slice(rows.start // per, rows.stop // per), cols),
                     _Holds(layer, slice(rows.start // 64, rows.stop // 64), cols),
                     _Holds(layer, slice(None)) if double_quant else None,
                     _Holds(layer) if double_quant else None, "float32")
    stack = plan.stack(w.shape, np.float32, shardings=held)
    assert stack.layers() == [1]
    want_read = (slice(0, 768), slice(0, 96)) if double_quant else (rows, cols)
    assert stack.read_index() == want_read
    for i in stack.layers():
        stack.set(i, w[i][stack.read_index()])
    whole = quant.quantize(w, double_quant=double_quant)
    if double_quant:  # the offset is an fp32 mean whose summation order XLA picks per program: checked apart
        # (measured up to 3.7e-7 relative over input seeds 5-9; bound 1.5e-6, 4x); the codes, absmax and nested
        # tables below are then compared exactly
        np.testing.assert_allclose(stack.offset[0], np.asarray(whole.offset)[1], rtol=1.5e-6)
        whole = quant.quantize(w, offset=np.array([whole.offset[0], stack.offset[0]], np.float32))
    np.testing.assert_array_equal(stack.codes[0], np.asarray(whole.codes)[1, 128:256, 32:64])
    np.testing.assert_array_equal(stack.absmax[0], np.asarray(whole.absmax)[1, 4:8, 32:64])
    if double_quant:
        np.testing.assert_array_equal(stack.nested[0], np.asarray(whole.nested_absmax)[1])

    # a part that starts inside a packing chunk widens to the whole chunk (256 rows); columns stay as held
    inside = NF4Tensor(_Holds(layer, slice(64 // per * 2, 256 // per), cols), _Holds(layer, slice(2, 4), cols),
                       held.nested_absmax, held.offset, "float32")
    assert plan.stack(w.shape, np.float32, shardings=inside).box == (range(1, 2), range(0, 256), range(32, 64))
