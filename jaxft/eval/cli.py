"""`python -m jaxft.eval`: base vs tuned, side by side, written as report.json, report.md and report.html.

Examples:
  python -m jaxft.eval --tuned runs/quickstart --tasks data/eval.jsonl --shots data/train.jsonl --out runs/eval
  python -m jaxft.eval --base smollm2-135m-instruct --tuned out/adapter --choices mc.jsonl --perplexity notes.txt
  python -m jaxft.eval --base smollm2-135m-instruct --perplexity notes.txt --window 256 --stride 128

--tuned takes a peft adapter directory, a merged model directory or a jaxft run directory (its adapter/ or merged/
export; its config names the base, so --base may be left out). Systems compared on --tasks: the base zero-shot,
the base with the first --k records of --shots as earlier chat turns (the "have you tried prompting?" baseline),
and the tuned model. With --tuned, the forgetting probe compares base and tuned perplexity on general English text
shipped with jaxft and calls a relative increase above --threshold forgetting.

File formats: --tasks and --shots: JSONL of chat records (messages, prompt+completion, instruction+output, or
prompt+reference; the final assistant turn is the reference; an optional "regex" field per line). --choices: JSONL
of {"context", "choices": [...], "answer": index}. --perplexity: a .txt file or JSONL of {"text"}.
"""

from __future__ import annotations

import argparse
import re
import sys

from jaxft.errors import ConfigError, JaxftError
from jaxft.eval.compare import EvalSettings, compare
from jaxft.eval.model import check_model_path, load_base, load_tuned, resolve_tuned
from jaxft.eval.report import check_out_dir, markdown, write_report
from jaxft.eval.tasks import read_choice_items, read_task_items, read_texts


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxft.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = EvalSettings()
    ap.add_argument("--base", default=None, help="the base model: HF directory, .gguf, Hub id or "
                    "smollm2-135m-instruct (default: the run directory's model.path)")
    ap.add_argument("--tuned", default=None, help="peft adapter dir, merged model dir or jaxft run dir")
    ap.add_argument("--tasks", default=None, help="JSONL of prompts with references (generation metrics)")
    ap.add_argument("--shots", default=None, help="JSONL of training examples for the k-shot baseline")
    ap.add_argument("--k", type=int, default=d.k, help=f"examples in the k-shot prompt (default {d.k}; 0: none)")
    ap.add_argument("--choices", default=None, help="JSONL of multiple-choice items (log-likelihood scoring)")
    ap.add_argument("--perplexity", default=None, help="a .txt file or JSONL of texts for perplexity")
    ap.add_argument("--regex", default=None, help="regex metric pattern: a group is extracted and compared to the "
                    "reference; without a group, the pattern must match the output")
    ap.add_argument("--json-field", default=None, help="JSON field metric: a dotted path compared between output "
                    "and reference")
    ap.add_argument("--limit", type=int, default=0, help="use the first N items of each file (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--examples", type=int, default=d.examples, help="outputs shown side by side")
    ap.add_argument("--resamples", type=int, default=d.resamples, help="bootstrap resamples for the 95%% intervals")
    ap.add_argument("--seed", type=int, default=d.seed, help="bootstrap seed")
    ap.add_argument("--window", type=int, default=d.window, help="perplexity window (tokens)")
    ap.add_argument("--stride", type=int, default=d.stride, help="perplexity stride (tokens; = window: disjoint)")
    ap.add_argument("--threshold", type=float, default=d.threshold,
                    help="forgetting: relative perplexity increase on general text above which the verdict is "
                         f"forgetting (default {d.threshold})")
    ap.add_argument("--no-forgetting", action="store_true", help="skip the forgetting probe")
    ap.add_argument("--out", default="eval_report", help="output directory (default eval_report)")
    ap.add_argument("--overwrite", action="store_true", help="replace report files already in --out")
    return ap


def _settings(args) -> EvalSettings:
    for name in ("max_new_tokens", "batch_size", "resamples"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    for name in ("k", "examples", "limit"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} {getattr(args, name)}: must be 0 or more")
    if args.window < 2 or not 1 <= args.stride <= args.window:
        raise ConfigError(f"--window {args.window} --stride {args.stride}: need window >= 2 and 1 <= stride <= "
                          "window")
    if not args.threshold > 0:
        raise ConfigError(f"--threshold {args.threshold}: must be a positive fraction (0.05 = 5%)")
    if args.regex is not None:
        try:
            re.compile(args.regex)
        except re.error as e:
            raise ConfigError(f"--regex {args.regex!r}: not a valid regular expression ({e})") from None
    return EvalSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, k=args.k,
                        examples=args.examples, resamples=args.resamples, seed=args.seed, regex=args.regex,
                        json_field=args.json_field, window=args.window, stride=args.stride, threshold=args.threshold)


def _head(xs: list, limit: int) -> list:
    return xs[:limit] if limit else xs


def run(args) -> dict:
    """Validate everything that needs no weights, then load the models and compare them; returns the report."""
    settings = _settings(args)
    if args.shots and not args.tasks:
        raise ConfigError("--shots builds the k-shot prompt for --tasks; give --tasks too")
    if not (args.tasks or args.choices or args.perplexity or (args.tuned and not args.no_forgetting)):
        raise ConfigError("nothing to evaluate: give --tasks, --choices, --perplexity or --tuned (forgetting probe)")
    source = resolve_tuned(args.tuned) if args.tuned else None
    base_path = args.base or (source.base if source else None)
    if base_path is None:
        raise ConfigError("--base is required (only a jaxft run directory given as --tuned names its base)")
    check_model_path(base_path, "--base")
    items = _head(read_task_items(args.tasks), args.limit) if args.tasks else []
    for it in items:
        if it.regex is not None:
            try:
                re.compile(it.regex)
            except re.error as e:
                raise ConfigError(f"{args.tasks} line {it.line}: regex {it.regex!r} is not valid ({e})") from None
    shots = read_task_items(args.shots)[:settings.k] if args.shots else []
    choices = _head(read_choice_items(args.choices), args.limit) if args.choices else []
    texts = _head(read_texts(args.perplexity), args.limit) if args.perplexity else []
    check_out_dir(args.out, args.overwrite)

    print(f"loading the base model {base_path} ...", file=sys.stderr, flush=True)
    base = load_base(base_path)
    tuned = None
    if source is not None:
        print(f"loading the tuned model ({source.kind}) {source.path} ...", file=sys.stderr, flush=True)
        tuned = load_tuned(source, base)
    sources = {"base": base_path}
    if source is not None:
        sources["tuned"] = f"{source.path} ({source.kind})"
    for flag, path in (("tasks", args.tasks), ("shots", args.shots), ("choices", args.choices),
                       ("perplexity", args.perplexity)):
        if path:
            sources[flag] = path
    return compare(base, tuned, settings, items=items, shots=shots, choices=choices, texts=texts,
                   forgetting=not args.no_forgetting, sources=sources)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = run(args)
    except (JaxftError, OSError, ValueError) as e:  # every input error is a JaxftError; the others a backstop
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_report(report, args.out)
    print(markdown(report))
    print(f"wrote {', '.join(paths)}", file=sys.stderr)
    return 0
