"""End to end through `python -m jaxft.train` on a tiny random Llama (SmolLM2's tokenizer, hidden 32) and a tiny
chat JSONL: preemption + resume is bitwise exact, mistakes are one-line errors before any compute, and a run
directory holds what it promises (config.yaml, run.json, metrics.jsonl, curves.png, summary.json, the adapter).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from jaxft.schema import ConfigError
from jaxft.train import check, load_config
from jaxft.train.__main__ import main

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS, SAVE_EVERY = 6, 3


def _write_model(d: str) -> None:
    """A random tiny Llama whose vocabulary is SmolLM2's, with that tokenizer saved beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import jaxft

    tok = jaxft.load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(d)
    tok.save_pretrained(d)


def _write_data(path: str, n: int = 40) -> None:
    with open(path, "w") as f:
        for i in range(n):
            q = f"What is {i} plus {i % 7}?"
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": str(i + i % 7)}]}) + "\n")


def _config(tmp, out: str, **sections) -> dict:
    cfg = {
        "output_dir": out,
        "model": {"path": str(tmp / "model")},
        "data": {"train": [str(tmp / "train.jsonl")], "eval_size": 8, "seq_len": 64, "packing": True},
        "method": {"type": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "train": {"steps": STEPS, "batch_size": 2, "save_every": SAVE_EVERY, "log_every": 1, "keep_last": 2},
        "eval": {"generate": 0, "batch_size": 4},
        "export": {"adapter": True, "merged": False, "verify": "off"},
    }
    for k, v in sections.items():
        cfg[k] = dict(cfg[k], **v) if isinstance(v, dict) else v
    return cfg


def _yaml(tmp, name: str, cfg: dict) -> str:
    p = str(tmp / f"{name}.yaml")
    with open(p, "w") as f:
        yaml.safe_dump(cfg, f)
    return p


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", JAX_DEFAULT_MATMUL_PRECISION="highest")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """A directory holding the tiny model (`model/`) and the chat data (`train.jsonl`)."""
    tmp = tmp_path_factory.mktemp("trainer_run")
    os.makedirs(tmp / "model")
    _write_model(str(tmp / "model"))
    _write_data(str(tmp / "train.jsonl"))
    return tmp


@pytest.fixture(scope="module")
def runs(tmp):
    """Run A uninterrupted; run B preempted by SIGTERM after its first checkpoint (`python -m jaxft.train`'s main in a
    child process), then re-run with the same config (it resumes). A and the resume run in this process."""
    a, b = str(tmp / "run_a"), str(tmp / "run_b")
    assert main([_yaml(tmp, "a", _config(tmp, a))]) == 0
    cfg_b = _yaml(tmp, "b", _config(tmp, b))
    first = subprocess.run([sys.executable, os.path.join(HERE, "trainer_child.py"), cfg_b], env=_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([cfg_b])
    second = subprocess.CompletedProcess([cfg_b], code, out.getvalue(), "")
    # run C: killed with SIGKILL once step 5 is logged (checkpoint at step 3), then resumed; it also scores 2 eval
    # prompts before training, a figure the resumed run must keep
    c = str(tmp / "run_c")
    cfg_c = _yaml(tmp, "c", _config(tmp, c, eval={"generate": 2, "max_new_tokens": 2}))
    killed = subprocess.run([sys.executable, os.path.join(HERE, "trainer_child.py"), cfg_c],
                            env=dict(_env(), JAXFT_TEST_KILL_AT="5"), cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([cfg_c])
    resumed = subprocess.CompletedProcess([cfg_c], code, out.getvalue(), "")
    return {"tmp": tmp, "a": a, "b": b, "c": c, "first": first, "second": second, "killed": killed,
            "resumed": resumed}


def _steps(run_dir: str) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_preempted_run_resumes_bitwise(runs):
    first, second = runs["first"], runs["second"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stdout[-3000:]
    assert "SIGTERM received: checkpoint saved at step 3" in first.stdout, first.stdout[-2000:]
    assert "resuming" in second.stdout and f"from step {SAVE_EVERY}" in second.stdout, second.stdout[-2000:]
    # the preempted process stopped at the checkpoint: it logged steps 1..3 only, the resumed one 4..6
    rows_b = [json.loads(line) for line in open(os.path.join(runs["b"], "metrics.jsonl"))]
    assert len([r for r in rows_b if r["kind"] == "train"]) == STEPS  # no step logged twice
    sb, sa = _steps(runs["b"]), _steps(runs["a"])
    assert sorted(sa) == list(range(1, STEPS + 1)) and sorted(sb) == sorted(sa)
    assert [sb[s] for s in sorted(sb)] == [sa[s] for s in sorted(sa)]  # bitwise equal loss curves
    with open(os.path.join(runs["a"], "adapter", "adapter_model.safetensors"), "rb") as f:
        adapter_a = f.read()
    with open(os.path.join(runs["b"], "adapter", "adapter_model.safetensors"), "rb") as f:
        adapter_b = f.read()
    assert adapter_a == adapter_b
    summary = json.load(open(os.path.join(runs["b"], "summary.json")))
    assert summary["steps"] == STEPS and summary["stopped"] == "completed" and summary["resumed at steps"] == [3]


def _tb_scalars(run_dir: str, tag: str) -> dict[int, list[float]]:
    """step -> values of `tag` as TensorBoard shows them: events files read in order, and a SessionLog START at step
    s (a writer's purge_step) hides the earlier events at steps >= s, as TensorBoard's loader does."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    seen: list[tuple[int, float]] = []
    for path in sorted(glob.glob(os.path.join(run_dir, "tb", "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                seen = [(s, v) for s, v in seen if s < event.step]
            for value in event.summary.value:
                if value.tag == tag:
                    seen.append((event.step, value.simple_value))
    out: dict[int, list[float]] = {}
    for step, v in seen:
        out.setdefault(step, []).append(v)
    return out


def test_killed_run_resumes_without_replayed_logs(runs):
    """kill -9 after step 5 with the last checkpoint at step 3: the resumed run takes steps 4-6 again; metrics.jsonl
    and TensorBoard show each step once (the lost steps 4-5 cut), with the losses of the uninterrupted run, a resume
    mark at step 3, and the summary keeps the base score measured by the killed process."""
    killed, resumed = runs["killed"], runs["resumed"]
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert resumed.returncode == 0 and "from step 3" in resumed.stdout, resumed.stdout[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(runs["c"], "metrics.jsonl"))]
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == list(range(1, STEPS + 1)), train_steps  # fails before: 1 2 3 4 5 4 5 6
    assert [r["step"] for r in rows if r["kind"] == "resume"] == [3]
    sa = _steps(runs["a"])
    assert _steps(runs["c"]) == sa  # the replayed steps are the same steps, bitwise
    tb = _tb_scalars(runs["c"], "train/loss")
    assert sorted(tb) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in tb.values()), tb
    assert all(abs(tb[s][0] - sa[s]) <= 1e-6 * abs(sa[s]) for s in sa)  # TensorBoard stores float32
    summary = json.load(open(os.path.join(runs["c"], "summary.json")))
    assert summary["resumed at steps"] == [3] and summary["steps"] == STEPS
    assert isinstance(summary["exact match before (%)"], float)  # measured by the killed process, kept
    assert summary["train time (s)"] >= summary["step time (s)"] + summary["first steps incl. compile (s)"]


def test_run_directory_contents(runs):
    a = runs["a"]
    info = json.load(open(os.path.join(a, "run.json")))
    assert info["seed"] == 0 and info["total_steps"] == STEPS
    # LoRA r=4 on all 7 linear modules of 2 layers (hidden 32, kv 16, intermediate 64): r * (in + out) each
    per_layer = 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 2 + (64 + 32))
    assert info["trainable_parameters"] == 2 * per_layer
    for pkg in ("jax", "flax", "optax", "orbax-checkpoint"):
        assert info["versions"][pkg] == md.version(pkg)
    saved = yaml.safe_load(open(os.path.join(a, "config.yaml")))
    assert saved["optim"]["lr"] == 1e-2 and saved["train"]["steps"] == STEPS and saved["output_dir"] == a
    assert os.path.getsize(os.path.join(a, "curves.png")) > 1000
    with open(os.path.join(a, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.load(open(os.path.join(a, "summary.json")))
    el = summary["eval loss"]
    assert math.isfinite(el) and 0 < el < 2 * math.log(49152)
    rows = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    last_eval = [r for r in rows if r["kind"] == "eval" and "eval_loss" in r][-1]
    assert last_eval["step"] == STEPS and last_eval["eval_loss"] == el
    assert os.path.exists(os.path.join(a, "adapter", "adapter_config.json"))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_output_dir_of_another_run_is_refused(runs, capsys):
    tmp, a = runs["tmp"], runs["a"]
    before = {f: os.path.getmtime(os.path.join(a, f)) for f in os.listdir(a)}
    capsys.readouterr()
    assert main([_yaml(tmp, "other", _config(tmp, a, optim={"lr": 5e-3}))]) == 2
    line = _error_line(capsys)
    assert "holds another run" in line and "optim.lr" in line
    assert {f: os.path.getmtime(os.path.join(a, f)) for f in os.listdir(a)} == before


def test_foreign_output_dir_is_refused_untouched(tmp, capsys):
    d = tmp / "foreign"
    os.makedirs(d)
    (d / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([_yaml(tmp, "foreign", _config(tmp, str(d)))]) == 2
    assert "not a jaxft run" in _error_line(capsys)
    assert os.listdir(d) == ["notes.txt"] and (d / "notes.txt").read_text() == "mine"


def test_config_mistakes_are_one_line_errors(tmp, capsys):
    out = str(tmp / "never")
    capsys.readouterr()
    assert main([_yaml(tmp, "typo", _config(tmp, out)), "train.stpes=3"]) == 2
    line = _error_line(capsys)
    assert "stpes" in line and "did you mean 'steps'" in line, line

    assert main([_yaml(tmp, "long", _config(tmp, out, data={"seq_len": 256}))]) == 2
    line = _error_line(capsys)
    assert "seq_len" in line and "128" in line, line

    unknown = tmp / "unknown.jsonl"
    unknown.write_text("".join(json.dumps({"foo": i}) + "\n" for i in range(5)))
    assert main([_yaml(tmp, "unknown", _config(tmp, out, data={"train": [str(unknown)]}))]) == 2
    line = _error_line(capsys)
    assert "cannot detect the format" in line and "foo" in line, line

    bad = tmp / "bad.jsonl"
    bad.write_text("".join(json.dumps({"messages": [{"role": "user"}]}) + "\n" for i in range(5)))
    assert main([_yaml(tmp, "bad", _config(tmp, out, data={"train": [str(bad)]}))]) == 2
    line = _error_line(capsys)
    assert "no usable record" in line and "5 malformed" in line, line
    assert not os.path.exists(out)  # nothing was written for any of them


def test_diverging_loss_stops_and_keeps_last_good_checkpoint(tmp):
    """An absurd learning rate makes the loss blow up: the run exits 1 with a clear message, the failed update is
    not saved, and the latest checkpoint is an earlier, finite one."""
    out = str(tmp / "run_diverge")
    cfg = _config(tmp, out, optim={"lr": 1e3, "warmup_steps": 0, "max_grad_norm": None},
                  train={"steps": 40, "save_every": 1, "divergence_factor": 2.0})
    cfg["method"] = {"type": "full"}  # full fine-tuning can blow the logits up; a LoRA on a tiny model barely can
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([_yaml(tmp, "diverge", cfg)])
    text = buf.getvalue()
    assert code == 1, text[-2000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    stopped = summary["stopped"]
    assert ("diverging" in stopped or "not finite" in stopped) and "last good checkpoint: step" in stopped
    kept = int(stopped.split("last good checkpoint: step ")[1].split(")")[0])
    assert kept < summary["steps"] + 1
    losses = _steps(out)
    assert all(math.isfinite(v) for v in losses.values())  # the bad step was never logged as a step taken
    assert not os.path.exists(os.path.join(out, "merged"))  # nothing exported from a failed run


def test_summary_holds_numbers(runs):
    summary = json.load(open(os.path.join(runs["a"], "summary.json")))
    for key, value in summary.items():
        if key.endswith(("(s)", "(%)", "parameters")) or key in ("tokens/s", "steps", "eval loss", "exported step"):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
    assert summary["trainable parameters"] < summary["total parameters"]
    assert summary["complete"] is True and summary["exported step"] == STEPS


def test_refused_run_leaves_output_dir_usable(tmp, capsys):
    """Refused after the data is read (warm-up longer than the run): nothing is written, and the corrected command
    is not refused as 'another run' (before: config.yaml was left behind and claimed the directory)."""
    out = str(tmp / "refused")
    capsys.readouterr()
    assert main([_yaml(tmp, "refused", _config(tmp, out, optim={"warmup_steps": 10}))]) == 2
    line = _error_line(capsys)
    assert "warmup_steps" in line and "10" in line, line
    assert not os.path.exists(out)
    cfg = load_config(_yaml(tmp, "fixed", _config(tmp, out)))
    assert "valid" in check(cfg) and not os.path.exists(out)


@pytest.mark.parametrize("change, message", [
    ({"optim": {"warmup_steps": 10}}, "optim.warmup_steps"),
    ({"data": {"train": ["missing.jsonl"]}}, "missing.jsonl"),
    ({"data": {"eval_size": 40}}, "eval_size=40"),
    ({"export": {"checkpoint": "best"}}, "train.eval_every"),
    ({"train": {"early_stopping_patience": 2}}, "train.eval_every"),
])
def test_check_catches_without_weights(tmp, change, message):
    """`check(cfg)` (what --check runs) refuses these before reading any weight, and writes nothing."""
    out = str(tmp / "checked")
    cfg = load_config(_yaml(tmp, "checked", _config(tmp, out, **change)))
    with pytest.raises(ConfigError) as e:
        check(cfg)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not os.path.exists(out)


def test_finished_run_run_again_exports_only_what_is_missing(runs, capsys):
    """Run A again with export.merged added: it says the run is complete, exits 0 and writes merged/ only; the
    final evaluation is not re-run and summary.json keeps its figures (before: eval and export re-ran, and the
    summary got a 0.0006 s train time and 0 tokens/s). A third run has nothing to do."""
    tmp, a = runs["tmp"], runs["a"]
    before = json.load(open(os.path.join(a, "summary.json")))
    metrics_before = open(os.path.join(a, "metrics.jsonl")).read()
    adapter_mtime = os.path.getmtime(os.path.join(a, "adapter", "adapter_model.safetensors"))
    capsys.readouterr()
    assert main([_yaml(tmp, "a_merged", _config(tmp, a, export={"merged": True}))]) == 0
    text = capsys.readouterr().out
    assert "this run is complete" in text and "merged" in text, text[-2000:]
    assert os.path.exists(os.path.join(a, "merged", "config.json"))
    after = json.load(open(os.path.join(a, "summary.json")))
    for key in ("train time (s)", "tokens/s", "eval loss", "steps", "stopped", "exported step"):
        assert after[key] == before[key], key
    assert after["merged"] == os.path.join(a, "merged")
    assert open(os.path.join(a, "metrics.jsonl")).read() == metrics_before  # no evaluation re-run
    assert os.path.getmtime(os.path.join(a, "adapter", "adapter_model.safetensors")) == adapter_mtime
    assert main([_yaml(tmp, "a_merged", _config(tmp, a, export={"merged": True}))]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert json.load(open(os.path.join(a, "summary.json"))) == after
