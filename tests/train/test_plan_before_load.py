"""`python -m jaxft.train CONFIG --plan`: the memory planner's check runs before any weight is read; a run that does
not fit is refused in one line with the planner's answer; one that fits goes on to train. On CPU the check is off
unless asked for (on GPU and TPU it is on unless `--no-plan`)."""

from __future__ import annotations

import os

import jax
import pytest

import jaxft
from jaxft.train import __main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(ROOT, "configs", "quickstart.yaml")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> list[str]:
    """Overrides of the quickstart config for a tiny random Llama (the planner reads only its config.json; the
    step compiles in about a second)."""
    d = str(tmp_path_factory.mktemp("plan") / "model")
    config = jaxft.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    jaxft.save_pretrained(config, jaxft.init_params(config, jax.random.key(0)), d)
    return [f"model.path={d}", "data.seq_len=64", "train.batch_size=4"]


@pytest.fixture
def runs(monkeypatch):
    """Replaces the run itself (weights, training): records that it was reached."""
    monkeypatch.setenv("JAXFT_KEEP_HOST_MEMORY", "0")
    reached = []
    monkeypatch.setattr(cli, "run", lambda cfg: reached.append(cfg) or {"stopped": "completed"})
    return reached


def test_a_run_that_cannot_fit_is_refused_before_loading(small, tmp_path, runs, capsys):
    """64 KiB per device: the planner's answer (nothing tried fits: the frozen base alone exceeds it, so no
    candidate is compiled) as the one error line, exit 2, and the run (which would read the weights) never
    starts."""
    code = cli.main([QUICK, *small, f"output_dir={tmp_path}/run", "--plan", "--device-memory", "65536"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and not runs
    assert len(err) == 1, err
    assert "GiB per device, the device has 0.00 GiB" in err[0] and "nothing tried fits" in err[0], err[0]
    assert not os.path.exists(tmp_path / "run")


def test_a_run_that_fits_is_planned_then_run(small, tmp_path, runs, capsys, monkeypatch):
    """The host's memory: it fits, the plan line is printed, the run starts. Without --plan on CPU the planner is
    not called at all."""
    assert cli.main([QUICK, *small, f"output_dir={tmp_path}/run", "--plan"]) == 0
    assert len(runs) == 1
    assert "GiB per device of" in capsys.readouterr().out

    def no_plan(*a, **k):
        raise AssertionError("the planner ran on CPU without --plan")

    monkeypatch.setattr(cli, "check_fits", no_plan)
    assert cli.main([QUICK, *small, f"output_dir={tmp_path}/run"]) == 0
    assert len(runs) == 2
