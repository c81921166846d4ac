"""`python -m jaxft.train` as 2 real processes x 4 CPU devices (jax.distributed from the JAX_* variables, gloo
collectives, coordinator on 127.0.0.1), full fine-tuning and LoRA over the default mesh (FSDP over all 8 devices):
each process reads only its slabs of the weights and builds only its rows of each batch; the run ends with the
training losses, the eval losses (evaluate() every 2 steps and at the end, across both processes) and the export of
the same run in one process on one device, the export written once (by process 0)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml

from hf_models import train_losses, write_tiny_smollm_vocab_model
from jaxft.train.__main__ import main
from optional_import import optional

safetensors_numpy = optional("safetensors.numpy")
torch = optional("torch")  # the tiny model's writer (transformers) needs it

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS = 4
# 2 processes x 4 devices vs one device, measured (jax 0.10.2, one seed): largest relative loss difference 9.1e-8
# (LoRA) and 8.9e-8 (full); with 8 eval rows held out (2026-12-02), train and eval losses 0 (LoRA, equal bit for bit)
# and 6.8e-8 (full); largest |diff| of the exported tensors 1.6e-7 (the peft adapter; lora_B up to 0.02)
# and 1.9e-8 (the merged model). Bounds: the sharded-step loss bound of test_sharded_training (1e-5), and the
# exports at >= 30x what was measured (one seed only, so wider than 3x).
LOSS_RTOL = 1e-5
EXPORT_TOL = {"lora": 5e-6, "full": 1e-6}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mh_trainer") / "model")
    os.makedirs(d)
    write_tiny_smollm_vocab_model(d, hidden=64, intermediate=128)
    return d


def _config(tmp, model_dir: str, out: str, method: str) -> str:
    data = tmp / "train.jsonl"
    if not data.exists():
        with open(data, "w") as f:
            for i in range(48):
                msgs = [{"role": "user", "content": f"What is {i} plus {i % 7}?"},
                        {"role": "assistant", "content": str(i + i % 7)}]
                f.write(json.dumps({"messages": msgs}) + "\n")
    lora = {"type": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}
    cfg = {"output_dir": out, "model": {"path": model_dir},
           "data": {"train": [str(data)], "eval_size": 8, "seq_len": 64, "packing": True},
           "method": lora if method == "lora" else {"type": "full"},
           "optim": {"lr": 1e-2 if method == "lora" else 1e-3, "warmup_steps": 1},
           "train": {"steps": STEPS, "batch_size": 8, "save_every": 2, "log_every": 1, "keep_last": 2,
                     "eval_every": 2, "report_to": "none"},
           "eval": {"generate": 0, "batch_size": 8},
           "export": {"adapter": method == "lora", "merged": method == "full", "verify": "off"}}
    path = str(tmp / f"{os.path.basename(out)}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(config: str) -> list[str]:
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
                   JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4", TF_CPP_MIN_LOG_LEVEL="2",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxft.train", config], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _eval_losses(run_dir: str) -> dict[int, float]:
    """`{step: eval loss}` of the eval records in a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["eval_loss"] for r in records if r.get("kind") == "eval"}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_process_trainer_matches_one_device(model, tmp_path, method):
    ref, multi = str(tmp_path / "ref"), str(tmp_path / "multi")
    assert main([_config(tmp_path, model, ref, method)]) == 0
    outs = _two_processes(_config(tmp_path, model, multi, method))
    assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1} over 8 devices" in outs[0]
    got, want = train_losses(multi), train_losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    # evaluate() across the processes: every eval record, and the end-of-run eval loss, as one device measures them
    got_eval, want_eval = _eval_losses(multi), _eval_losses(ref)
    assert sorted(got_eval) == sorted(want_eval) and len(want_eval) >= 1, (got_eval, want_eval)
    worst = max([worst] + [abs(got_eval[s] - want_eval[s]) / abs(want_eval[s]) for s in want_eval])
    print(f"{method}: eval losses {got_eval} (2 processes) vs {want_eval} (one device)")
    kind, name = ("adapter", "adapter_model.safetensors") if method == "lora" else ("merged", "model.safetensors")
    assert sorted(os.listdir(os.path.join(multi, kind))) == sorted(os.listdir(os.path.join(ref, kind)))
    a = safetensors_numpy.load_file(os.path.join(multi, kind, name))
    b = safetensors_numpy.load_file(os.path.join(ref, kind, name))
    assert sorted(a) == sorted(b)
    err = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in b)
    moved = max(float(np.max(np.abs(b[k]))) for k in b if "lora_B" in k) if method == "lora" else None
    print(f"{method}: largest relative loss difference {worst:.2e}, export max |diff| {err:.2e}"
          + (f" (lora_B up to {moved:.3g})" if moved is not None else ""))
    assert worst <= LOSS_RTOL, (got, want)
    assert err <= EXPORT_TOL[method], err
    if moved is not None:
        assert moved > 1e-3  # the adapter trained (B starts at zero)


def test_each_process_loads_only_its_share(tmp_path):
    """The trainer's own load across 2 processes (LoRA, FSDP over all 8 devices, a 252 MB fp32 model: SmolLM2's
    49152-token vocabulary at hidden 1024): each process's peak host memory while loading, as the run summary
    reports it, stays near its half of the weights; a whole copy would be the model's size."""
    d = str(tmp_path / "model")
    os.makedirs(d)
    write_tiny_smollm_vocab_model(d, hidden=1024, intermediate=1024)
    model_bytes = os.path.getsize(os.path.join(d, "model.safetensors"))
    config = _config(tmp_path, d, str(tmp_path / "run"), "lora")
    with open(config) as f:
        cfg = yaml.safe_load(f)
    cfg["train"].update(steps=1, eval_every=0)
    cfg["data"]["eval_size"] = 0
    cfg["export"]["adapter"] = False
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    _two_processes(config)
    with open(tmp_path / "run" / "summary.json") as f:
        per_process = json.load(f)["host memory while loading (MB)"]
    model_mb = model_bytes / 2**20
    print(f"host memory while loading: {per_process} MB per process; the model {model_mb:.1f} MB")
    assert len(per_process) == 2
    # measured: 169.2 and 169.3 MB = 0.70 of the 240 MB model: the process's half (120 MB), the block of one
    # device being read (the embedding's [49152, 128], 25 MB) and one 16 MB slab of the file. Reading every local
    # block before placing them (jax.make_array_from_callback) measured 186-190 MB. A whole copy would pass 1.0.
    assert all(mb < 0.85 * model_mb for mb in per_process), (per_process, model_mb)
