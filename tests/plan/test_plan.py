"""The memory planner (`jaxft.plan`): its figures against the abstract trees, against XLA's own argument sizes,
against a real step's peak resident memory, its recommendations, its errors, and the shipped templates."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jaxft
from jaxft import parallel, peft
from jaxft.errors import ConfigError
from jaxft.models.params import abstract_params, logical_axes
from jaxft.plan import parse_bytes, plan_config, plan_memory, refuse_unless_fits
from jaxft.train.config import load_config, method_spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(ROOT, "configs", "quickstart.yaml")
SMALL = ["data.seq_len=64", "train.batch_size=4"]  # SmolLM2 LoRA, a step that compiles in ~10 s
TEMPLATES = {"llama3.1-8b-lora-8gpu.yaml": (8, "80GiB"), "llama3.1-70b-full-fsdp.yaml": (64, "80GiB"),
             "llama3.1-8b-tpu-v5e-16.yaml": (16, "16GiB")}


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxft.plan", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _expected_bytes(tree, axes, rules, mesh: dict[str, int]) -> int:
    """Per-device bytes of `tree` written out by hand: each dimension divided by the sizes of the mesh axes its
    logical axis maps to (no NamedSharding involved)."""
    specs = jax.tree.leaves(parallel.partition_specs(axes, rules),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    total = 0
    for leaf, spec in zip(jax.tree.leaves(tree), specs):
        dims = list(leaf.shape)
        for i, entry in enumerate(tuple(spec)):
            names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
            dims[i] //= math.prod(mesh[n] for n in names)
        total += math.prod(dims) * jnp.dtype(leaf.dtype).itemsize
    return total


def _trees(overrides):
    cfg = load_config(QUICK, overrides)
    config = jaxft.load_config(cfg.model.path)
    spec = method_spec(cfg.method)
    base = abstract_params(config, jnp.dtype(cfg.model.param_dtype))
    adapter = jax.eval_shape(lambda p, k: peft.init(spec, config, p, k), base, jax.random.key(0))
    return cfg, config, spec, base, adapter


def test_state_bytes_are_the_leaf_sums_and_xla_agrees_one_device():
    cfg, config, spec, base, adapter = _trees(SMALL)
    plan = plan_memory(cfg, config, device_memory=parse_bytes("8GiB"))
    nbytes = lambda t: sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(t))
    assert plan.params == nbytes(base) + nbytes(adapter)
    assert plan.gradients == nbytes(adapter)
    assert plan.optimizer == 2 * nbytes(adapter) + 8  # AdamW m and v (float32), two int32 step counts (Adam, schedule)
    # XLA's own count of the step's inputs: the trees and the batch (3 int32 arrays and a bool mask); the key is
    # unused without dropout, and jit drops unused arguments
    batch = 4 * 64 * (3 * 4 + 1)
    assert plan.compiled["argument"] == plan.params + plan.optimizer + batch
    assert plan.total == sum(plan.per_device()[k] for k in ("params", "optimizer", "gradients", "activations"))


def test_qlora_state_bytes_count_every_nf4_field():
    """QLoRA (NF4 base, double quantisation, uint8 codes): the planner's parameter bytes are the adapter plus, per
    quantised [L, in, out] projection, codes L*in/2*out + absmax L*in/64*out (uint8) + nested absmax
    L*ceil(in*out/64/256)*4 + offset L*4, and the dense embedding and norms; written out here by hand."""
    cfg, config, spec, base, adapter = _trees([*SMALL, "method.type=qlora"])
    plan = plan_memory(cfg, config, device_memory=parse_bytes("8GiB"))
    nbytes = lambda t: sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(t))
    expected, n_quantised = 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(base)[0]:
        names = [getattr(k, "key", k) for k in path]
        if names[-1] == "kernel" and names[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"):
            layers, k, n = leaf.shape
            expected += layers * (k // 2 * n + k // 64 * n + math.ceil(k * n / 64 / 256) * 4 + 4)
            n_quantised += 1
        else:
            expected += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    assert n_quantised == 7
    assert plan.params == expected + nbytes(adapter)
    assert plan.gradients == nbytes(adapter) and plan.optimizer == 2 * nbytes(adapter) + 8
    assert plan.params < nbytes(base) / 2  # the base is quantised (fp32 base: ~7x smaller)


def test_state_bytes_per_device_on_4_fake_devices():
    """Shards on a (data 1, fsdp 4, tensor 1) mesh through the CLI (its own process fakes 4 CPU devices)."""
    r = _cli(QUICK, *SMALL, "--devices", "4", "--device-memory", "8GiB", "--json", "--no-recommend")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cfg, config, spec, base, adapter = _trees(SMALL)
    mesh = {"data": 1, "fsdp": 4, "tensor": 1}
    assert out["mesh"] == mesh
    rules = cfg.parallel.rules
    base_b = _expected_bytes(base, logical_axes(config), rules, mesh)
    adapter_b = _expected_bytes(adapter, peft.logical_axes(spec, config, adapter), rules, mesh)
    got = out["per_device_bytes"]
    assert base_b < sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(base)) / 2  # it is sharded
    assert got["params"] == base_b + adapter_b
    assert got["gradients"] == adapter_b
    assert got["optimizer"] == 2 * adapter_b + 8
    assert out["compiled_bytes"]["argument"] == got["params"] + got["optimizer"] + 64 * (3 * 4 + 1)
    assert set(out) >= {"per_device_bytes", "device_memory_bytes", "fits", "recommendation"}
    assert out["fits"] is True and out["device_memory_bytes"] == 8 << 30


@pytest.mark.slow  # 33 s on 2 cores (a real SmolLM2 step in a child process)
def test_predicted_step_memory_matches_peak_rss_of_a_real_step():
    """A real SmolLM2 LoRA step (quickstart: seq 256 x 4 rows, fp32) in a fresh process: the planner's temporaries
    + outputs - aliases against the growth of the peak RSS over the step. Measured: 1.0966 GB predicted, 1.1103 GB
    measured (ratio 1.013); allowed 20%."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "plan", "rss_child.py"), QUICK], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ratio = out["measured"] / out["predicted"]
    assert out["predicted"] > 500e6  # big enough for the page-level noise not to matter
    assert 0.8 <= ratio <= 1.2, out
    assert math.isfinite(out["loss"])


@pytest.mark.slow  # 47 s on 2 busy cores: four compiles of the SmolLM2 step
def test_a_run_that_does_not_fit_gets_overrides_that_fit_before_any_weight_is_read(monkeypatch):
    def no_weights(*a, **k):
        raise AssertionError("the planner read weights")

    monkeypatch.setattr(jaxft.io.hf, "load_pretrained", no_weights)
    monkeypatch.setattr(jaxft, "load_pretrained", no_weights)
    overrides = ["data.seq_len=256", "train.batch_size=4", "model.remat=none"]
    memory = parse_bytes("0.75GiB")
    report = plan_config(QUICK, overrides, device_memory=memory)
    assert not report.plan.fits
    rec = report.recommendation
    assert rec.overrides and rec.plan is not None and rec.plan.fits, rec
    # the overrides applied by hand give a plan that fits
    again = plan_config(QUICK, [*overrides, *rec.overrides], device_memory=memory, recommend_fix=False)
    assert again.plan.fits and again.plan.total == rec.plan.total
    with pytest.raises(ConfigError, match=r"GiB per device.*try: model.remat=full"):
        refuse_unless_fits(report)
    assert refuse_unless_fits(again) is again


def test_bad_input_is_one_line():
    r = _cli(QUICK, *SMALL, "parallel.mesh.fsdp=3", "--devices", "4", "--no-recommend")
    errors = [line for line in r.stderr.splitlines() if not line.startswith("plan: ")]  # progress lines apart
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: parallel.mesh:"), r.stderr
    r = _cli(QUICK, "--device-memory", "lots", "--no-recommend")
    assert r.returncode == 2 and r.stderr.startswith("error: --device-memory"), r.stderr
    with pytest.raises(ConfigError, match="--devices 4: this process has 1"):
        plan_config(QUICK, SMALL, devices=4)
    assert parse_bytes("80GiB") == 80 << 30 and parse_bytes("40GB") == 40 * 10**9 and parse_bytes("16G") == 16 << 30


@pytest.mark.slow  # 8B on 8 devices, 70B on 64 (57 s compile measured), 8B on 16: minutes in all
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_plan_here(name):
    n, memory = TEMPLATES[name]
    r = _cli(os.path.join("configs", name), "--devices", str(n), "--device-memory", memory, "--json",
             "--no-recommend")
    assert r.returncode in (0, 1), r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["per_device_bytes"]["total"] > 0 and out["mesh"]["fsdp"] * out["mesh"]["data"] >= 1


@pytest.mark.slow  # one 8B compile on 8 fake devices: about 45 s of CPU
def test_goal_llama8b_full_fsdp8_fits_18gib():
    """Issue 14's goal: Llama-3.1-8B full fine-tuning (fp32 master weights and AdamW, bf16 compute, seq 2048, one row
    per device, full remat), FSDP over 8 devices, within 18 GiB per device. Planned (XLA:CPU): 19.63 GiB with the
    loss split by rows (each device gathering the whole head and building a whole-head fp32 partial dW per chunk),
    17.89 GiB with the vocabulary-parallel loss (jaxft.ops.loss; 17.28 GiB on jax 0.12)."""
    r = _cli("configs/llama3.1-8b-full.yaml", "model.path=configs/models/llama-3.1-8b", "data.seq_len=2048",
             "train.batch_size=8", "train.grad_accum=1", "--devices", "8",
             "--device-memory", "18GiB", "--json", "--no-recommend")
    assert r.returncode in (0, 1), r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert out["fits"], out["per_device_bytes"]["total"] / 2**30


QLORA_GOALS = {"llama-2-7b": "6GiB", "llama-3.1-70b": "46GiB"}


@pytest.mark.slow  # one compile each: about 10 s of CPU
@pytest.mark.parametrize("model", sorted(QLORA_GOALS))
def test_goal_qlora_fits_one_device(model):
    """Issue 15's goals: QLoRA r16 all-linear (NF4 base, double quantisation), bf16 compute, seq 2048, batch 1, full
    remat, one device: Llama-2-7B within 6 GiB, Llama-3.1-70B within 46 GiB. Planned (XLA:CPU): 7.02 / 47.84 GiB
    with the unrolled attention blocks (all blocks' scores live at once) and whole dequantised fp32 weights (all
    seven of a layer live at once); 6.15 / 46.61 GiB with the tiled attention; 5.80 / 44.84 GiB with the XLA NF4
    path's loop over row blocks."""
    r = _cli("configs/llama3.1-8b-lora.yaml", f"model.path=configs/models/{model}", "method.type=qlora",
             "model.remat=full", "method.dropout=0", "data.seq_len=2048", "train.batch_size=1", "train.grad_accum=1",
             "--device-memory", QLORA_GOALS[model], "--json", "--no-recommend")
    assert r.returncode in (0, 1), r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["trainable_parameters"] > 0 and out["per_device_bytes"]["params"] < out["parameters"]  # 4-bit base
    assert out["fits"], out["per_device_bytes"]["total"] / 2**30


def test_templates_pass_check(tmp_path):
    """`python -m jaxft.train TEMPLATE --check` with the template's model config.json beside a stand-in tokenizer
    (SmolLM2's: no Llama 3 tokenizer is on this machine) and the quickstart data."""
    from jaxft.train.__main__ import main as train_main

    tok = jaxft.load_tokenizer("smollm2-135m-instruct")  # transformers' GGUF reader: needs torch
    for name in sorted(TEMPLATES):
        cfg = load_config(os.path.join(ROOT, "configs", name))
        model_dir = tmp_path / name
        model_dir.mkdir()
        shutil.copy(os.path.join(ROOT, cfg.model.path, "config.json"), model_dir / "config.json")
        tok.save_pretrained(str(model_dir))
        rc = train_main([os.path.join(ROOT, "configs", name), f"model.path={model_dir}",
                         f"data.train=[{os.path.join(ROOT, 'data', 'quickstart', 'train.jsonl')}]",
                         f"output_dir={tmp_path / 'runs' / name}", "--check"])
        assert rc == 0, name
