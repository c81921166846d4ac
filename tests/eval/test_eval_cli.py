"""`python -m jaxft.eval` end to end on a tiny random model with a peft LoRA adapter (report files, the three
systems, intervals, the forgetting probe), its one-line errors before any weight is read, the k-shot prompt, the
classification of tuned-model paths, and the trainer's exact match through jaxft.eval."""

import copy
import json
import os

import pytest
import yaml

from jaxft.eval import cli, forgetting_verdict, read_task_items, render_prompts, resolve_tuned
from jaxft.errors import FileFormatError
from optional_import import optional

peft_lib = optional("peft")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


TASKS = [{"prompt": f"ISO date for: {d}", "completion": iso} for d, iso in
         [("5 March 2021", "2021-03-05"), ("1 May 1999", "1999-05-01"), ("30 June 2010", "2010-06-30")]]
SHOTS = [{"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "ISO date for: 2 Jan 2000"},
                       {"role": "assistant", "content": "2000-01-02"}]},
         {"prompt": "ISO date for: 9 Feb 2001", "completion": "2001-02-09"}]
CHOICES = [{"context": "The capital of France is", "choices": ["Paris", "London"], "answer": 0},
           {"query": "2 + 2 =", "choices": ["4", "5", "22"], "gold": 0}]


@pytest.fixture(scope="module")
def adapter_dir(tiny_hf, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("eval_adapter"))
    cfg = peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_lib.get_peft_model(copy.deepcopy(tiny_hf), cfg).save_pretrained(d)
    return d


@pytest.mark.slow  # 26 s on 2 cores (three models' generations and plots)
def test_report_end_to_end(tiny_dir, adapter_dir, tmp_path, capsys):
    tasks, shots = _jsonl(tmp_path / "tasks.jsonl", TASKS), _jsonl(tmp_path / "shots.jsonl", SHOTS)
    choices = _jsonl(tmp_path / "mc.jsonl", CHOICES)
    text = tmp_path / "notes.txt"
    text.write_text("The river rose in the night and the town woke to water in the streets. " * 6)
    out = str(tmp_path / "report")
    rc = cli.main(["--base", tiny_dir, "--tuned", adapter_dir, "--tasks", tasks, "--shots", shots, "--k", "2",
                   "--choices", choices, "--perplexity", str(text), "--max-new-tokens", "4", "--window", "64",
                   "--stride", "64", "--resamples", "200", "--examples", "2", "--regex", r"(\d{4})", "--out", out])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    # no third-party noise: every stderr line is one of ours (phase lines, loading, the files written)
    for line in captured.err.splitlines():
        assert line.startswith(("loading the ", "base zero-shot: ", "base 2-shot: ", "tuned: ", "base: ",
                                "wrote ")), line
    report = json.load(open(os.path.join(out, "report.json")))
    systems = report["tasks"]["systems"]
    assert list(systems) == ["base zero-shot", "base 2-shot", "tuned"] and report["tasks"]["shots"] == 2
    for scores in systems.values():
        assert set(scores) == {"exact", "normalised", "contains", "chrf", "regex", "corpus_chrf"}
        for m, v in scores.items():
            if m != "corpus_chrf":
                assert v["low"] <= v["mean"] <= v["high"]
    assert len(report["tasks"]["examples"]) == 2 and report["tasks"]["examples"][0]["reference"] == "2021-03-05"
    assert all(len(o) == 3 for o in report["tasks"]["outputs"].values())
    assert set(report["multiple_choice"]["systems"]) == {"base", "tuned"}
    ppl = report["perplexity"]["systems"]
    assert ppl["base"]["tokens"] == ppl["tuned"]["tokens"] > 0 and ppl["base"]["perplexity"] != ppl["tuned"][
        "perplexity"]
    f = report["forgetting"]
    assert f["threshold"] == 0.05 and f["increase"] == pytest.approx(f["tuned"] / f["base"] - 1)
    assert f["forgetting"] == (f["increase"] > 0.05)
    page = open(os.path.join(out, "report.html")).read()
    assert page.count("data:image/png;base64,") == 3  # generation, multiple choice, perplexity + forgetting
    md = open(os.path.join(out, "report.md")).read()
    assert "| metric | base zero-shot | base 2-shot | tuned |" in md and f["verdict"] in md
    assert md in captured.out
    # the same report again is refused, before any compute
    assert cli.main(["--base", tiny_dir, "--perplexity", str(text), "--out", out]) == 2
    assert "already holds report.json" in capsys.readouterr().err


def test_k_shot_prompt_puts_examples_first_as_turns(tiny_dir, tmp_path):
    import jaxft

    tok = jaxft.load_tokenizer(tiny_dir)
    items = read_task_items(_jsonl(tmp_path / "t.jsonl", [{"messages": [
        {"role": "system", "content": "SYS"}, {"role": "user", "content": "ISO date for: 5 March 2021"},
        {"role": "assistant", "content": "2021-03-05"}]}]))
    shots = read_task_items(_jsonl(tmp_path / "s.jsonl", SHOTS))
    zero, few = render_prompts(tok, items)[0], render_prompts(tok, items, shots)[0]
    text = tok.decode(few)
    order = [text.index(s) for s in ("SYS", "2 Jan 2000", "2000-01-02", "9 Feb 2001", "2001-02-09", "5 March 2021")]
    assert order == sorted(order) and "Be brief." not in text
    assert tok.decode(zero) == tok.apply_chat_template(
        [{"role": "system", "content": "SYS"}, {"role": "user", "content": "ISO date for: 5 March 2021"}],
        tokenize=False, add_generation_prompt=True)


def _fail_load(*a, **k):
    raise AssertionError("a model was loaded before the input was checked")


@pytest.mark.parametrize("make_args,message", [
    (lambda p: ["--tasks", str(p / "missing.jsonl")], "missing.jsonl: no such file"),
    (lambda p: ["--tasks", _bad_line(p)], "bad.jsonl line 2 column"),
    (lambda p: ["--tasks", _jsonl(p / "t.jsonl", [{"text": "no reference"}])], "t.jsonl line 1: a text record has no "
                                                                                 "reference"),
    (lambda p: ["--tasks", _jsonl(p / "t.jsonl", TASKS), "--regex", "(unclosed"], "--regex '(unclosed': not a valid"),
    (lambda p: ["--choices", _jsonl(p / "c.jsonl", [{"context": "x", "choices": ["a", "b"], "answer": 2}])],
     "c.jsonl line 1: answer must be the index (0-1)"),
    (lambda p: ["--tuned", str(p / "nothing")], "nothing: no such directory"),
    (lambda p: ["--perplexity", str(p / "x.txt"), "--window", "32", "--stride", "64"], "need window >= 2 and 1 <="),
    (lambda p: [], "nothing to evaluate"),
    (lambda p: ["--shots", _jsonl(p / "s.jsonl", SHOTS)], "--shots builds the k-shot prompt for --tasks"),
])
def test_bad_input_is_one_line_before_loading(tmp_path, monkeypatch, capsys, make_args, message):
    monkeypatch.setattr(cli, "load_base", _fail_load)
    assert cli.main(["--base", "smollm2-135m-instruct", *make_args(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def _bad_line(p):
    (p / "bad.jsonl").write_text(json.dumps(TASKS[0]) + "\n{nope\n")
    return str(p / "bad.jsonl")


def test_tuned_paths_are_classified(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": "/models/base"}, "output_dir": str(run)}))
    with pytest.raises(FileFormatError, match="without an adapter/ or merged/ export"):
        resolve_tuned(str(run))
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "merged").mkdir()
    (run / "merged" / "config.json").write_text("{}")
    got = resolve_tuned(str(run))
    assert (got.kind, got.path, got.base) == ("adapter", str(run / "adapter"), "/models/base")
    assert resolve_tuned(str(run / "merged")).kind == "merged"
    assert resolve_tuned(str(run / "adapter")).kind == "adapter"
    with pytest.raises(FileFormatError, match="neither a peft adapter directory"):
        resolve_tuned(str(tmp_path))


def test_forgetting_verdict_threshold():
    assert forgetting_verdict(10.0, 10.4, 0.05)["forgetting"] is False
    v = forgetting_verdict(10.0, 10.6, 0.05)
    assert v["forgetting"] is True and v["increase"] == pytest.approx(0.06) and "rose 6.0%" in v["verdict"]
    assert forgetting_verdict(10.0, 10.6, 0.1)["forgetting"] is False


def test_trainer_exact_match_goes_through_eval(tiny_dir):
    """The trainer's exact match (jaxft.train.scoring, now a binding over jaxft.eval): items whose reference is the
    model's own greedy output count, the others do not."""
    import jaxft
    from jaxft.generate.greedy import greedy_generate
    from jaxft.train.scoring import exact_match
    from jaxft.train.step import StaticModel

    config, params = jaxft.load_pretrained(tiny_dir)
    tok = jaxft.load_tokenizer(tiny_dir)
    prompts = [tok(t)["input_ids"] for t in ("one two", "the sea is", "a b c d e f")]
    outs = greedy_generate(config, params, prompts, max_new_tokens=3, eos_token_ids=[tok.eos_token_id])
    refs = [tok.decode(outs[0], skip_special_tokens=True), "not this", tok.decode(outs[2], skip_special_tokens=True)]
    model = StaticModel(config, None, jaxft.ModelOptions())
    got = exact_match(model, params, None, tok, list(zip(prompts, refs)), max_new_tokens=3, batch_size=2)
    assert got == pytest.approx(200 / 3)


def test_module_help_answers():
    """`python -m jaxft.eval --help` in a fresh process: exit 0, the usage and the file formats, nothing on stderr."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "jaxft.eval", "--help"], capture_output=True, text=True, timeout=120,
                       cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("usage: python -m jaxft.eval")
    assert "--threshold" in r.stdout and "File formats" in r.stdout
