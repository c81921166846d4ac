"""Sharded training on 8 fake CPU devices against one device: losses, PartitionSpecs, per-device work and bytes of
the compiled step, checkpoints restored under other meshes, a caller's arrays kept from donation.

The measurements run once, in a child process (`sharded_child.py`): the device count is fixed when jax starts, and
the rest of the suite runs on one device (the trainer's default mesh fills every device with fsdp, so 8 devices for
the whole suite would turn every trainer test into an 8-way FSDP run). Measured cost of the child: about 155 s of
CPU on 2 cores (10 compiled steps: full fine-tuning and LoRA on one device and 4 meshes, 5 steps each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MESHES = ("8x1x1", "1x8x1", "2x2x2", "1x4x2")
# Largest relative loss difference measured against one device (5 steps, fp32, AdamW lr 1e-2, jax 0.10.2 and
# 0.12): 3.57e-6 (full fine-tuning, 1x4x2, with the vocabulary-parallel loss), 1.5e-7 (LoRA). The bound keeps a
# 3.1x margin.
LOSS_RTOL = 1.1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "result.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_child.py"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("mesh", MESHES)
def test_losses_equal_one_device(measured, method, mesh):
    ref, got = measured[method]["1x1x1"]["losses"], measured[method][mesh]["losses"]
    assert len(got) == len(ref) == 5
    for a, b in zip(got, ref):
        assert abs(a - b) <= LOSS_RTOL * abs(b), (mesh, got, ref)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("mesh", ["8x1x1", "1x8x1"])
def test_per_device_flops_and_bytes(measured, method, mesh):
    """n-way data parallelism and FSDP: per-device FLOPs at most 1.3/n of one device's (measured 0.125-0.147 at
    n=8); FSDP: per-device argument bytes (parameters, optimizer state, frozen base, batch) at most 1.3/n
    (measured 0.126 full, 0.142 LoRA); data parallelism keeps whole copies (1.0)."""
    ref, got = measured[method]["1x1x1"], measured[method][mesh]
    assert got["flops"] <= 1.3 / 8 * ref["flops"], got["flops"] / ref["flops"]
    if mesh == "1x8x1":
        assert got["argument_bytes"] <= 1.3 / 8 * ref["argument_bytes"], got["argument_bytes"] / ref["argument_bytes"]
        assert got["param_bytes_per_device"] <= 1.3 / 8 * ref["param_bytes_per_device"]
    else:
        assert got["param_bytes_per_device"] == pytest.approx(ref["param_bytes_per_device"], rel=1e-3)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("mesh", ["2x2x2", "1x4x2"])
def test_mixed_meshes_split_the_work(measured, method, mesh):
    """With tensor=2 the rows split over data x fsdp (4 ways) and the heads / MLP columns over tensor: per-device
    FLOPs at most 1.3/8 (measured 0.126-0.129), bytes at most 1.3 / (fsdp * tensor) (measured 0.25-0.26 at 2x2x2,
    0.13 at 1x4x2)."""
    ref, got = measured[method]["1x1x1"], measured[method][mesh]
    _, fsdp, tensor = map(int, mesh.split("x"))
    assert got["flops"] <= 1.3 / 8 * ref["flops"]
    assert got["param_bytes_per_device"] <= 1.3 / (fsdp * tensor) * ref["param_bytes_per_device"]


def test_partition_specs_follow_the_rules(measured):
    """fsdp+tensor: embed on fsdp, heads / mlp / vocab on tensor; LoRA's A takes the kernel's input axis, B its
    output axis; the layer axis and the rank are never split."""
    full, lora = measured["full"]["1x4x2"]["specs"], measured["lora"]["1x4x2"]["specs"]
    q, o = "['model']['layers']['self_attn']['q_proj']['kernel']", "['model']['layers']['self_attn']['o_proj']['kernel']"
    assert full[q] == str((None, "fsdp", "tensor"))
    assert full[o] == str((None, "tensor", "fsdp"))
    assert full["['model']['embed_tokens']['weight']"] == str(("tensor", "fsdp"))
    assert full["['lm_head']['kernel']"] == str(("fsdp", "tensor"))
    assert full["['model']['norm']['weight']"] == str(())
    assert full["['model']['layers']['mlp']['down_proj']['kernel']"] == str((None, "tensor", "fsdp"))
    assert lora[q + "['lora_a']"] == str((None, "fsdp"))
    assert lora[q + "['lora_b']"] == str((None, None, "tensor"))
    assert lora[o + "['lora_a']"] == str((None, "tensor"))
    assert lora[o + "['lora_b']"] == str((None, None, "fsdp"))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpoint_restores_under_another_mesh(measured, method):
    """A checkpoint written from a (1,8,1) mesh restores bit-exactly into (2,2,2) shardings and onto one device."""
    for where, n_devices in (("2x2x2", 8), ("one_device", 1)):
        got = measured["restore"][method][where]
        assert got == {"equal": True, "target_shardings": True, "devices": n_devices}


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("mesh", MESHES)
def test_donation_keeps_the_callers_arrays(measured, method, mesh):
    """The step donates the trainable tree and the optimizer state; the caller's own tree (on one device, placed
    with `jaxft.parallel.place`) stays alive and unchanged. On 8x1x1 every leaf is replicated, where a plain
    `device_put` returns the caller's buffer for device 0 (checked: the hazard is real)."""
    got = measured[method][mesh]
    assert got["caller_leaves_deleted"] == 0 and got["caller_unchanged"]
    if mesh == "8x1x1":
        assert got["plain_device_put_aliases"]
