"""Evaluation: task metrics on generated text, log-likelihood multiple choice (as lm-evaluation-harness scores it),
perplexity over windows, the forgetting probe, and the side-by-side report of base zero-shot, base k-shot and tuned
(`python -m jaxft.eval`). The trainer's end-of-run evaluation uses `generate_texts`, `exact_match_percent` and
`mean_loss` from here.

    from jaxft.eval import load_base, load_tuned, resolve_tuned, read_task_items, compare, write_report
    base = load_base("smollm2-135m-instruct")
    tuned = load_tuned(resolve_tuned("runs/quickstart"), base)
    report = compare(base, tuned, items=read_task_items("eval.jsonl"), shots=read_task_items("train.jsonl"))
    write_report(report, "runs/eval")
"""

from jaxft.eval.compare import EvalSettings, compare, forgetting_verdict, general_text, score_generations
from jaxft.eval.likelihood import (ChoiceItem, ChoiceScores, Perplexity, encode_pair, mean_loss, multiple_choice,
                                   perplexity, token_logprobs, window_spans)
from jaxft.eval.metrics import (bootstrap_ci, chrf, contains, corpus_chrf, exact, json_field_match, normalised,
                                normalize_answer, regex_match, score_items)
from jaxft.eval.model import EvalModel, TunedSource, load_base, load_tuned, resolve_tuned
from jaxft.eval.report import html_page, markdown, write_report
from jaxft.eval.tasks import (TaskItem, exact_match_percent, generate_texts, read_choice_items, read_task_items,
                              read_texts, render_prompts)

__all__ = [
    "ChoiceItem", "ChoiceScores", "EvalModel", "EvalSettings", "Perplexity", "TaskItem", "TunedSource",
    "bootstrap_ci", "chrf", "compare", "contains", "corpus_chrf", "encode_pair", "exact", "exact_match_percent",
    "forgetting_verdict", "general_text", "generate_texts", "html_page", "json_field_match", "load_base",
    "load_tuned", "markdown", "mean_loss", "multiple_choice", "normalised", "normalize_answer", "perplexity",
    "read_choice_items", "read_task_items", "read_texts", "regex_match", "render_prompts", "resolve_tuned",
    "score_generations", "score_items", "token_logprobs", "window_spans", "write_report",
]
