"""Checkpointer and StopSignal: bitwise round trips of real optax states, retention, crash safety, SIGTERM.

The reference for a restore is the saved state itself: arrays must come back bit for bit (tolerance 0), with the same
dtypes (fp32, bf16, int32, typed PRNG keys) and tree structure, and optax must continue from them exactly as from
the original. Process-level behaviour (kill -9 mid-write, SIGTERM, 2 devices) runs in tests/train/ckpt_child.py.
"""

import dataclasses
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft.train.checkpoint import Checkpointer
from jaxft.train.signals import StopSignal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = os.path.join(ROOT, "tests", "train", "ckpt_child.py")
sys.path.insert(0, os.path.dirname(CHILD))
import ckpt_child  # noqa: E402


def run_child(mode: str, directory, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, CHILD, mode, str(directory)], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _LowRank:
    """A composite weight like the PEFT ones: array children and a static field."""

    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(default=2.0, metadata={"static": True})


@jax.jit(static_argnums=0)
def _update(opt, params, opt_state, scale):
    """One optax step with made-up gradients sin(scale * p) (jitted: eager optax compiles each op)."""
    grads = jax.tree.map(lambda p: jnp.sin(p.astype(jnp.float32) * scale).astype(p.dtype), params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def train_state(seed: int = 0, steps: int = 2) -> tuple[dict, optax.GradientTransformation]:
    """params (fp32, bf16, a dataclass node) and a real adamw state after `steps` updates, plus PRNG keys."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    params = {
        "dense": {"w": jax.random.normal(k1, (5, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)},
        "emb": jax.random.normal(k2, (7, 4), jnp.float32).astype(jnp.bfloat16),
        "adapter": [_LowRank(jax.random.normal(k4, (5, 2)), jnp.ones((2, 3)))],
    }
    opt = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = opt.init(params)
    for i in range(steps):
        params, opt_state = _update(opt, params, opt_state, float(i + 1))
    state = {"params": params, "opt": opt_state, "rng": k3, "rng_data": jax.random.key_data(k3)}
    return state, opt


def assert_bitwise_equal(got, want) -> None:
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (jax.tree_util.keystr(path), g.dtype, w.dtype)
        if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes(), jax.tree_util.keystr(path)


@pytest.mark.parametrize("async_save", [True, False])
def test_roundtrip_is_bitwise_and_optax_continues_identically(tmp_path, async_save):
    state, opt = train_state()
    extra = {"epoch": 1, "position": 37, "config_hash": "ab12", "rng": [int(v) for v in state["rng_data"]]}
    with Checkpointer(tmp_path, async_save=async_save) as ckpt:
        assert ckpt.save(10, state, extra=extra)
        assert ckpt.latest_step() == 10
        restored, got_extra = ckpt.restore(jax.eval_shape(lambda: state))
    assert got_extra == extra
    assert_bitwise_equal(restored, state)
    assert all(x.sharding == y.sharding for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))

    continued = _update(opt, restored["params"], restored["opt"], 0.5)
    assert_bitwise_equal(continued, _update(opt, state["params"], state["opt"], 0.5))

    # A concrete state as the target, and a new process's view of the same directory.
    zeros = jax.tree.map(jnp.zeros_like, state)
    with Checkpointer(tmp_path) as again:
        assert again.latest_step() == 10
        restored, _ = again.restore(zeros, step=10)
    assert_bitwise_equal(restored, state)


def test_async_save_returns_before_the_checkpoint_is_on_disk(tmp_path):
    state = ckpt_child.big_state(0)  # 32 MiB: its write takes ~0.3 s here, the check below microseconds
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, state, extra={})
        assert not (tmp_path / "1").exists()  # the final folder appears only when the write commits
        assert ckpt.latest_step() == 1
        ckpt.wait()
        assert (tmp_path / "1").is_dir()


def _saved_steps(directory) -> list[int]:
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_keeps_last_n_and_best_k_and_never_deletes_the_newest(tmp_path):
    # (step, eval_loss or None). Orbax's max_to_keep=2 with best_fn would delete step 7 right after saving it
    # (worse than 2 and 5); the resume point must survive.
    saves = [(1, 3.0), (2, None), (3, 1.0), (4, None), (5, 2.0), (6, None), (7, 9.0), (8, None), (9, 0.5)]
    expected = {
        1: [1], 2: [1, 2], 3: [1, 2, 3], 4: [1, 3, 4], 5: [3, 4, 5], 6: [3, 5, 6],
        7: [3, 5, 6, 7], 8: [3, 5, 7, 8], 9: [3, 8, 9],
    }
    state, _ = train_state(steps=0)
    with Checkpointer(tmp_path, keep_last=2, keep_best=2) as ckpt:
        for step, loss in saves:
            metrics = {"train_loss": 1.0} if loss is None else {"eval_loss": loss, "train_loss": 1.0}
            assert ckpt.save(step, state, extra={"step": step}, metrics=metrics)
            ckpt.wait()
            assert _saved_steps(tmp_path) == expected[step], step
        assert ckpt.best_steps() == [9, 3]
        _, extra = ckpt.restore_best(state)
        assert extra == {"step": 9}
    with Checkpointer(tmp_path, keep_last=2, keep_best=2) as reopened:  # metrics are read back from disk
        assert reopened.best_steps() == [9, 3]
        reopened.save(10, state, extra={}, metrics={"eval_loss": float("nan")})  # NaN never counts as best
        reopened.save(11, state, extra={}, metrics={"eval_loss": 0.7})
        reopened.wait()
        assert _saved_steps(tmp_path) == [9, 10, 11]
        assert reopened.best_steps() == [9, 11]


def test_best_mode_max(tmp_path):
    state, _ = train_state(steps=0)
    with Checkpointer(tmp_path, keep_last=1, keep_best=1, best_metric="acc", best_mode="max") as ckpt:
        for step, acc in [(1, 0.2), (2, 0.9), (3, 0.5), (4, 0.1)]:
            ckpt.save(step, state, extra={}, metrics={"acc": acc})
        ckpt.wait()
        assert _saved_steps(tmp_path) == [2, 4]
        assert ckpt.best_steps() == [2]


def test_errors_are_one_line(tmp_path):
    state, _ = train_state(steps=0)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore(state)
        with pytest.raises(FileNotFoundError, match="has a 'eval_loss' metric"):
            ckpt.restore_best(state)
        ckpt.save(5, state, extra={"a": 1})
        wrong = jax.tree.map(lambda x: x, state)
        wrong["params"]["dense"]["w"] = jnp.zeros((5, 4), jnp.float32)
        with pytest.raises(ValueError, match=r"leaf 'params\.dense\.w': saved \(5, 3\), target \(5, 4\)") as e:
            ckpt.restore(wrong)
        assert "\n" not in str(e.value)
        missing = dict(state, extra_leaf=jnp.zeros(2))
        with pytest.raises(ValueError, match=r"leaf 'extra_leaf': saved no such leaf, target \(2,\)"):
            ckpt.restore(missing)
        fewer = {k: v for k, v in state.items() if k != "rng_data"}
        with pytest.raises(ValueError, match=r"leaf 'rng_data': saved \(2,\), target no such leaf"):
            ckpt.restore(fewer)
        with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 4 .* saved steps: \[5\]"):
            ckpt.restore(state, step=4)
        with pytest.raises(ValueError, match="step 3 is before the latest checkpoint 5"):
            ckpt.save(3, state, extra={})
        with pytest.raises(TypeError, match="extra must be a JSON dict"):
            ckpt.save(6, state, extra={"key": state["rng_data"]})
        with pytest.raises(ValueError, match="keep_last=0"):
            Checkpointer(tmp_path / "other", keep_last=0)


def test_same_step_is_skipped_unless_forced(tmp_path):
    state, _ = train_state(steps=0)
    other, _ = train_state(seed=1, steps=0)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(5, state, extra={"v": 1})
        assert not ckpt.save(5, other, extra={"v": 2})
        assert ckpt.restore(state)[1] == {"v": 1}
        assert ckpt.save(5, other, extra={"v": 2}, force=True)
        restored, extra = ckpt.restore(state)
    assert extra == {"v": 2}
    assert_bitwise_equal(restored, other)


def test_kill9_mid_write_leaves_the_previous_checkpoint(tmp_path):
    proc = run_child("kill", tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    names = os.listdir(tmp_path)
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names  # it was killed mid-write
    assert "2" not in names
    target = jax.eval_shape(lambda: ckpt_child.big_state(0))
    with Checkpointer(tmp_path) as ckpt:  # cleans the half-written folder up
        assert ckpt.latest_step() == 1
        restored, extra = ckpt.restore(target)
        assert extra == {"step": 1}
        assert_bitwise_equal(restored, ckpt_child.big_state(1))
        assert not any("tmp" in n for n in os.listdir(tmp_path))
        # The step that was lost can be saved again, and restored.
        new = ckpt_child.big_state(2)
        assert ckpt.save(2, new, extra={"step": 2})
        assert ckpt.restore(target)[1] == {"step": 2}


def test_leftover_temp_folder_does_not_break_saves(tmp_path):
    state, _ = train_state(steps=0)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, extra={})
    stale = tmp_path / "2.orbax-checkpoint-tmp-1234567"  # what a kill leaves
    stale.mkdir()
    (stale / "junk").write_text("half")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        assert ckpt.save(2, state, extra={"ok": True})
        assert ckpt.restore(state)[1] == {"ok": True}
    assert _saved_steps(tmp_path) == [1, 2] and not stale.exists()


def test_sigterm_saves_and_exits_zero(tmp_path):
    proc = run_child("loop", tmp_path)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    _, step, name = out.split()
    step = int(step)
    assert name == "SIGTERM" and step >= 3
    template = ckpt_child.loop_state(0)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == step
        restored, extra = ckpt.restore(template)
    assert extra == {"position": step}
    assert_bitwise_equal(restored, ckpt_child.loop_state(step))


def test_restore_lands_in_the_target_sharding(tmp_path):
    proc = run_child("sharded", tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "sharded ok" in out, err[-2000:]


def test_stop_signal_flags_then_second_ctrl_c_interrupts():
    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        signal.raise_signal(signal.SIGTERM)  # a second SIGTERM does not kill the stop under way
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before_int and signal.getsignal(signal.SIGTERM) is before_term
    with StopSignal() as stop:
        signal.raise_signal(signal.SIGINT)  # the first Ctrl-C only asks
        assert stop.requested and stop.signal_name == "SIGINT"
