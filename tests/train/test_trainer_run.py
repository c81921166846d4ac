"""End to end through `python -m jaxft.train` on a tiny random Llama (SmolLM2's tokenizer, hidden 32) and a tiny
chat JSONL: preemption (SIGTERM) and kill -9 + resume are bitwise exact and log each step once, a finished run run
again only adds missing exports, mistakes are one-line errors before any compute that leave output_dir unclaimed,
init_from takes the file's structure, a failed export check fails the run, the best checkpoint is exported with
early stopping, tokens/s excludes compilation and evaluations, metrics reach TensorBoard and W&B (offline), and a
run directory holds what it promises (config.yaml, run.json, metrics.jsonl, curves.png, summary.json, the adapter).
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
from hf_models import write_tiny_smollm_vocab_model
from jaxft.train.__main__ import main

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS, SAVE_EVERY = 6, 3


def _write_model(d: str) -> None:
    write_tiny_smollm_vocab_model(d)


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
    for pkg in ("jax", "optax", "orbax-checkpoint"):
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


def _run(tmp, name: str, cfg: dict) -> tuple[int, str, dict]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([_yaml(tmp, name, cfg)])
    path = os.path.join(cfg["output_dir"], "summary.json")
    return code, buf.getvalue(), (json.load(open(path)) if os.path.exists(path) else {})


def test_init_from_contradictions_are_one_line_errors(runs):
    """A config asking for DoRA r16, alpha 32, dropout 0.2 on an r4 LoRA file (before: silently trained and
    exported the file's LoRA, recorded as dora); `type: full` with init_from (before: dropped without a word)."""
    tmp, adapter = runs["tmp"], os.path.join(runs["a"], "adapter")
    cfg = _config(tmp, str(tmp / "from_dora"))
    cfg["method"] = {"type": "dora", "r": 16, "alpha": 32, "dropout": 0.2, "target_modules": "all-linear",
                     "init_from": adapter}
    with pytest.raises(ConfigError) as e:
        check(load_config(_yaml(tmp, "from_dora", cfg)))
    line = str(e.value)
    assert "\n" not in line and adapter in line, line
    for part in ("type dora (file: lora)", "r 16 (file: 4)", "alpha 32 (file: 8.0)", "dropout 0.2 (file: 0.0)"):
        assert part in line, (part, line)
    assert "target_modules" not in line  # all-linear is what the file's module list means
    cfg["method"] = {"type": "full", "init_from": adapter}
    with pytest.raises(ConfigError, match="init_from.*full"):
        load_config(_yaml(tmp, "from_full", cfg))
    assert not os.path.exists(tmp / "from_dora")


def test_init_from_records_what_ran(runs):
    """Continuing run A's adapter with only `init_from` (and one agreeing key): the run trains the file's LoRA r4,
    and config.yaml, summary.json and the model card say so."""
    tmp, adapter = runs["tmp"], os.path.join(runs["a"], "adapter")
    out = str(tmp / "from_a")
    cfg = _config(tmp, out, train={"steps": 2, "save_every": 0})
    cfg["method"] = {"init_from": adapter, "r": 4}
    code, text, summary = _run(tmp, "from_a", cfg)
    assert code == 0, text[-3000:]
    saved = yaml.safe_load(open(os.path.join(out, "config.yaml")))["method"]
    assert saved["type"] == "lora" and saved["r"] == 4 and saved["alpha"] == 8.0 and saved["init_from"] == adapter
    assert summary["method"] == "lora"
    exported = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert exported["r"] == 4 and exported["lora_alpha"] == 8 and not exported["use_dora"]
    card = open(os.path.join(out, "adapter", "README.md")).read()
    assert "Method: `lora`" in card and '"r": 4' in card
    assert main([_yaml(tmp, "from_a", cfg)]) == 0  # the same config, run again: recognised as this run


def test_failed_export_check_fails_the_run(tmp, monkeypatch):
    """An export whose reloaded logits are off (the merged model's final norm scaled by 1.01 on its way to disk) is
    named in the summary and the run exits 1; the adapter's check (correct) passes."""
    pytest.importorskip("peft", reason="the export check reloads with transformers/peft")
    import jax

    import jaxft

    save = jaxft.save_pretrained

    def bad_save(config, params, out_dir, *args, **kw):
        params = dict(params, model=dict(params["model"], norm=jax.tree.map(lambda w: w * 1.01,
                                                                            params["model"]["norm"])))
        return save(config, params, out_dir, *args, **kw)

    monkeypatch.setattr(jaxft, "save_pretrained", bad_save)
    out = str(tmp / "bad_export")
    code, text, summary = _run(tmp, "bad_export", _config(tmp, out, train={"steps": 2, "save_every": 0},
                                                          export={"merged": True, "verify": "on"}))
    assert code == 1, text[-3000:]
    assert summary["stopped"].startswith("export check failed: merged") and "adapter" not in summary["stopped"]
    assert summary["merged verify (rel. err)"] > 1e-3 and summary["adapter verify (rel. err)"] < 1e-4  # the bound
    assert "ABOVE the tolerance" in open(os.path.join(out, "merged", "README.md")).read()


def _scripted_eval(monkeypatch, losses: list[float], sleep: float = 0.0) -> list[int]:
    """Replace the eval loss by `losses` in order (sleeping `sleep` s in each); returns the list of call times."""
    import time

    from jaxft.train import loop

    calls = []

    def fake(eval_step, trainable, frozen, data, batch_size):
        time.sleep(sleep)
        calls.append(1)
        return losses[len(calls) - 1]

    monkeypatch.setattr(loop, "eval_loss", fake)
    return calls


def test_export_best_with_early_stopping(tmp, monkeypatch):
    """Eval losses 3.0, 2.0, 2.5, 2.6 at steps 1-4 with patience 2: the run stops after step 4 as complete, exports
    the step-2 weights and says why; those weights equal a plain 2-step run's (constant lr, same data order)."""
    _scripted_eval(monkeypatch, [3.0, 2.0, 2.5, 2.6, 2.7])
    sched = {"schedule": "constant"}
    best_out, plain_out = str(tmp / "best"), str(tmp / "plain2")
    code, text, summary = _run(tmp, "best", _config(
        tmp, best_out, optim=sched, train={"eval_every": 1, "early_stopping_patience": 2, "save_every": 0,
                                           "keep_best": 1},
        export={"checkpoint": "best"}))
    assert code == 0, text[-3000:]
    assert summary["steps"] == 4 and summary["stopped"].startswith("completed (early stopping")
    assert summary["exported step"] == 2 and "best" in summary["exported because"]
    assert "2" in summary["exported because"] and "lower is better" in summary["exported because"]
    monkeypatch.undo()
    code, text, _ = _run(tmp, "plain2", _config(tmp, plain_out, optim=sched, train={"steps": 2, "save_every": 0}))
    assert code == 0, text[-3000:]
    best = open(os.path.join(best_out, "adapter", "adapter_model.safetensors"), "rb").read()
    assert best == open(os.path.join(plain_out, "adapter", "adapter_model.safetensors"), "rb").read()


def test_tokens_per_second_excludes_compile_and_eval(tmp, monkeypatch):
    """tokens/s = tokens of the steps after the first / their own time: each 0.5 s evaluation and the first step's
    compilation are outside it (before: the first step's tokens were counted with its time subtracted, and every
    evaluation's time was counted)."""
    import numpy as np

    from jaxft.train import prepare

    _scripted_eval(monkeypatch, [3.0] * 10, sleep=0.5)
    out = str(tmp / "timed")
    cfg = _config(tmp, out, train={"eval_every": 2, "save_every": 0})
    code, text, summary = _run(tmp, "timed", cfg)
    assert code == 0, text[-3000:]
    prep = prepare(load_config(_yaml(tmp, "timed_check", dict(cfg, output_dir=str(tmp / "unused")))))
    batches = prep.data.train_batches(2, 0)
    tokens = [int(np.sum(next(batches)["segment_ids"] != 0)) for _ in range(STEPS)]
    assert summary["tokens/s"] * summary["step time (s)"] == pytest.approx(sum(tokens[1:]), rel=1e-9)
    assert summary["eval time in training (s)"] >= 2 * 0.5  # evals at steps 2 and 4 (6 is the final one)
    assert (summary["step time (s)"] + summary["first steps incl. compile (s)"]
            + summary["eval time in training (s)"]) <= summary["train time (s)"]
    printed = [line for line in text.splitlines() if line.startswith("eval generation")]
    assert printed in ([], ["eval generation: 0 prompts ending in an assistant turn"]), printed


def _wandb_offline_records(run_file: str) -> tuple[dict[int, dict], dict]:
    """(history rows by step, summary) of an offline W&B run file (`run-<id>.wandb`): a 7-byte header, then records
    in 32 KiB blocks, each chunk with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last),
    each record a `wandb_internal_pb2.Record`."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    pos, records, buf = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            records.append(pb.Record.FromString(buf))
            buf = b""
    history, summary = {}, {}
    for r in records:
        which = r.WhichOneof("record_type")
        items = r.history.item if which == "history" else r.summary.update if which == "summary" else []
        row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}
        if which == "history":
            history[row["_step"]] = row
        elif which == "summary":
            summary.update(row)
    return history, summary


def test_wandb_offline(tmp, monkeypatch):
    """train.report_to: [tensorboard, wandb] in W&B's offline mode (no network): the offline run file holds every
    logged train loss at its step and the run's summary, the same numbers as metrics.jsonl and summary.json."""
    pytest.importorskip("wandb", reason="wandb is in the dev extra (pip install -e '.[dev]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp / "wandb_run")
    code, text, summary = _run(tmp, "wandb", _config(tmp, out, train={"report_to": ["tensorboard", "wandb"],
                                                                      "save_every": 0}))
    assert code == 0, text[-3000:]
    import glob

    files = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, glob.glob(os.path.join(out, "wandb", "*"))
    history, logged = _wandb_offline_records(files[0])
    assert {s: row["train/loss"] for s, row in history.items() if "train/loss" in row} == _steps(out)
    assert history[STEPS]["eval/eval_loss"] == summary["eval loss"] == logged["eval loss"]
    assert logged["steps"] == STEPS and logged["tokens/s"] == summary["tokens/s"]
    assert os.path.isdir(os.path.join(out, "tb"))
