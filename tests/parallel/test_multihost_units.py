"""The single-process halves of multi-host runs: settings from config and environment, block reads of stored
tensors, per-process batch shares, and what a process other than 0 must not write. (Two real processes:
test_multihost.py.)"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxft
from jaxft.data.batches import Batches
from jaxft.data.render import Example
from jaxft.errors import ConfigError
from jaxft.io.convert import tensor_table
from jaxft.io.stored import StoredTensor, safetensors_tensors
from jaxft.parallel import distributed
from jaxft.train import report
from jaxft.train.signals import StopSignal

ENV = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}


def test_settings_from_config_then_environment():
    s = distributed.settings(None, ENV)
    assert (s.coordinator, s.num_processes, s.process_id, s.timeout_s) == ("10.0.0.1:1234", 4, 3, 300)
    assert s.source == "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID"
    # the config's fields win over the environment, field by field
    s = distributed.settings({"process_id": 1, "timeout_s": 5}, ENV)
    assert (s.process_id, s.num_processes, s.timeout_s) == (1, 4, 5.0)
    assert "parallel.distributed.process_id" in s.source
    # nothing set, no cluster: a single-process run, nothing to do
    assert distributed.settings(None, {}) is None
    assert distributed.initialize(None, {}) is None
    assert distributed.settings({"coordinator": "h:1", "num_processes": 1, "process_id": 0}, {}) is None
    # a cluster jax.distributed detects by itself
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    s = distributed.settings(None, slurm)
    assert s.auto and s.source == "SLURM" and s.coordinator is None
    assert distributed.settings(None, dict(slurm, SLURM_NTASKS="1")) is None


@pytest.mark.parametrize("section, env, words", [
    ({"coordinator": "10.0.0.1"}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "is not host:port"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}, "is not below num_processes=2"),
    ({"coordinator": "h:1", "num_processes": "two", "process_id": 0}, {}, "'two' is not a whole number"),
    ({"coordinator": "h:1"}, {}, "given but not parallel.distributed.num_processes (or JAX_NUM_PROCESSES)"),
    (None, {"JAX_PROCESS_ID": "1"}, "JAX_PROCESS_ID given but not"),
    ({"timeout_s": 0, "coordinator": "h:1", "num_processes": 2, "process_id": 0}, {}, "timeout_s: 0 must be > 0"),
])
def test_bad_settings_are_one_line_config_errors(section, env, words):
    with pytest.raises(ConfigError) as e:
        distributed.settings(section, env)
    assert words in str(e.value) and "\n" not in str(e.value)


def _tensor(tmp_path, shape, row_order=None) -> tuple[StoredTensor, np.ndarray]:
    from safetensors.numpy import save_file

    value = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    path = str(tmp_path / "t.safetensors")
    save_file({"w": value}, path)
    (t,) = safetensors_tensors(path)
    if row_order is not None:  # stored row i holds HF row row_order[i]
        import dataclasses

        t = dataclasses.replace(t, row_order=row_order)
        hf = np.empty_like(value)
        hf[row_order] = value
        value = hf
    return t, value


@pytest.mark.parametrize("ordered", [True, False])
def test_stored_block_reads_the_rows_a_shard_needs(tmp_path, ordered):
    order = None if ordered else np.random.default_rng(1).permutation(37)
    t, value = _tensor(tmp_path, (37, 12), order)
    for index in [(slice(0, 37), slice(0, 12)), (slice(5, 19), slice(4, 8)), (slice(30, 37),), (slice(0, 1),),
                  (slice(10, 10), slice(0, 12))]:
        got = t.block(index, np.float32, slab_bytes=3 * 12 * 4)  # 3 rows a slab: blocks cross slab edges
        np.testing.assert_array_equal(got, value[index])


def test_sharded_load_equals_the_plain_load(tmp_path):
    config = jaxft.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    jaxft.save_pretrained(config, jaxft.init_params(config, jax.random.key(0)), str(tmp_path / "m"))
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1), ("fsdp",))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), jaxft.abstract_params(config))
    _, want = jaxft.load_pretrained(str(tmp_path / "m"))
    _, got = jaxft.load_pretrained(str(tmp_path / "m"), shardings=shardings)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.sharding.is_equivalent_to(NamedSharding(mesh, P()), g.ndim)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    with pytest.raises(ConfigError, match="the shardings tree has no entry for 'model.norm.weight'"):
        bad = jax.tree.map(lambda s: s, shardings)
        del bad["model"]["norm"]
        jaxft.load_pretrained(str(tmp_path / "m"), shardings=bad)


def _batches() -> Batches:
    rng = np.random.default_rng(0)
    exs = [Example(rng.integers(1, 50, 5).astype(np.int32), np.ones(5, bool), 0, -1, None, 0, i) for i in range(11)]
    return Batches(exs, [(i,) for i in range(11)], 4, 8, 0, seed=3)


def test_batch_shares_make_up_the_global_batch_and_keep_one_position():
    whole, first, second = _batches(), _batches(), _batches()
    for _ in range(5):  # crosses an epoch end (11 rows, 4 a batch)
        want = next(whole)
        a, b = first.next_share(slice(0, 2)), second.next_share(slice(2, 4))
        for k in want:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), want[k])
        assert first.state() == second.state() == whole.state()


def test_process_rows_and_global_batch_on_one_process():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(None, ("data", "fsdp")))
    assert distributed.process_rows(sharding, (2, 8, 16), axis=1) == slice(0, 8)
    local = {"input_ids": np.arange(2 * 8 * 16, dtype=np.int32).reshape(2, 8, 16)}
    out = distributed.global_batch(local, sharding, (2, 8, 16))
    np.testing.assert_array_equal(np.asarray(out["input_ids"]), local["input_ids"])
    assert distributed.gather_ints([3, 4]).tolist() == [[3, 4]]
    assert distributed.agree(True) and not distributed.agree(False)


def test_stop_poll_on_one_process_is_the_local_flag():
    with StopSignal() as stop:
        assert not stop.poll(1)
        os.kill(os.getpid(), __import__("signal").SIGTERM)
        assert stop.poll(2) and stop.signal_name == "SIGTERM"


def test_only_process_0_writes_metrics_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "is_primary", lambda: False)
    w = report.MetricsWriter(str(tmp_path), report_to=("tensorboard",))
    w.write(1, "train", {"loss": 1.0})
    w.close()
    assert report.plot_curves(str(tmp_path)) is None
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(report, "is_primary", lambda: True)
    w = report.MetricsWriter(str(tmp_path), report_to=())
    w.write(1, "train", {"loss": 1.0})
    w.close()
    assert [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")] == [1.0]


def test_save_pretrained_writes_on_process_0_only(tmp_path, monkeypatch):
    from jaxft.io import hf

    config = jaxft.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    params = jaxft.init_params(config, jax.random.key(0))
    seen = []
    real = hf.iter_hf_tensors
    monkeypatch.setattr(hf, "iter_hf_tensors", lambda *a: (seen.append(n) or (n, v) for n, v in real(*a)))
    monkeypatch.setattr(hf.jax, "process_index", lambda: 1)
    hf.save_pretrained(config, params, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    assert seen == [e.hf_name for e in tensor_table(config)]  # every tensor gathered (a collective when sharded)
