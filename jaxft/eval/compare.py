"""Base vs tuned, side by side: the base model zero-shot, the base model with k examples from the training data in
its prompt, and the tuned model, on the same generation items (metrics with bootstrap confidence intervals and
example outputs), multiple-choice items and perplexity texts; and the forgetting probe.

The forgetting probe compares base and tuned perplexity on `texts/general_english.txt` (1,474 words of general
English written for jaxft, so no model has trained on it): a relative increase above the threshold (5% by default, a
figure fine-tuning guides use) is reported as forgetting.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import sys
from typing import Any, Sequence

from tqdm.auto import tqdm

from jaxft.eval import metrics
from jaxft.eval.likelihood import ChoiceItem, count_windows, multiple_choice, perplexity
from jaxft.eval.model import EvalModel
from jaxft.eval.tasks import TaskItem, generate_texts, render_prompts

GENERAL_TEXT = "general_english.txt"
PERCENT_METRICS = ("exact", "normalised", "contains", "regex", "json_field")  # 0/1 per item, reported in percent


def general_text() -> str:
    """The held-out general English text shipped with jaxft (package data of `jaxft.eval`)."""
    return importlib.resources.files("jaxft.eval").joinpath("texts", GENERAL_TEXT).read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How an evaluation runs. Generation is greedy (`max_new_tokens` at most); `k` training examples make the
    few-shot prompt (the first k of the shots file); `examples` items are shown side by side; confidence intervals
    are percentile bootstraps over items (`resamples`, `seed`, 95%); perplexity uses windows of `window` tokens
    advancing by `stride`; `threshold` is the forgetting probe's relative perplexity increase."""

    max_new_tokens: int = 64
    batch_size: int = 8
    k: int = 3
    examples: int = 5
    resamples: int = 1000
    seed: int = 0
    regex: str | None = None
    json_field: str | None = None
    window: int = 512
    stride: int = 256
    threshold: float = 0.05


def _bar(total: int, desc: str, quiet: bool):
    """A line naming the phase (logs see it too), then a bar on a terminal."""
    if not quiet:
        print(f"{desc}: {total} rows ...", file=sys.stderr, flush=True)
    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, disable=quiet or None, leave=False,
                dynamic_ncols=True)


def _interval(scores, s: EvalSettings, scale: float) -> dict[str, float]:
    mean, low, high = metrics.bootstrap_ci(scores, resamples=s.resamples, seed=s.seed)
    return {"mean": scale * mean, "low": scale * low, "high": scale * high}


def score_generations(outputs: Sequence[str], items: Sequence[TaskItem], s: EvalSettings) -> dict[str, Any]:
    """Per-metric `{mean, low, high}` (percent; chrF 0-100) over items, and the corpus chrF."""
    refs = [it.reference for it in items]
    per_item = metrics.score_items(outputs, refs, regex=s.regex, item_regex=[it.regex for it in items],
                                   json_field=s.json_field)
    out = {name: _interval(v, s, 100.0 if name in PERCENT_METRICS else 1.0) for name, v in per_item.items()}
    out["corpus_chrf"] = metrics.corpus_chrf(outputs, refs)
    return out


def forgetting_verdict(base_ppl: float, tuned_ppl: float, threshold: float) -> dict[str, Any]:
    """The probe's numbers and verdict: `increase` = tuned / base - 1; forgetting when it exceeds `threshold`."""
    increase = tuned_ppl / base_ppl - 1.0
    forgot = increase > threshold
    verdict = (f"forgetting: perplexity on general text rose {100 * increase:.1f}% (threshold {100 * threshold:g}%)"
               if forgot else
               f"no forgetting beyond the threshold: perplexity on general text changed {100 * increase:+.1f}% "
               f"(threshold {100 * threshold:g}%)")
    return {"base": base_ppl, "tuned": tuned_ppl, "increase": increase, "threshold": threshold, "forgetting": forgot,
            "verdict": verdict}


def _perplexity_of(model: EvalModel, texts: Sequence[str], s: EvalSettings, desc: str, quiet: bool) -> dict:
    with _bar(count_windows(model, texts, s.window, s.stride), desc, quiet) as bar:
        p = perplexity(model, texts, window=s.window, stride=s.stride, batch_size=max(1, s.batch_size // 2),
                       on_batch=bar.update)
    return {"perplexity": p.perplexity, "nll": p.nll, "tokens": p.tokens, "windows": p.windows}


def compare(base: EvalModel, tuned: EvalModel | None, settings: EvalSettings = EvalSettings(), *,
            items: Sequence[TaskItem] = (), shots: Sequence[TaskItem] = (), choices: Sequence[ChoiceItem] = (),
            texts: Sequence[str] = (), forgetting: bool = True, quiet: bool = False,
            sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Run every part that has inputs and return the report (plain JSON-able dict; see `jaxft.eval.report`).

    Systems: "base zero-shot" always, "base k-shot" when `shots` and k > 0, "tuned" when `tuned` is given.
    Perplexity, multiple choice and the forgetting probe compare base and tuned.
    """
    s = settings
    report: dict[str, Any] = {"settings": dataclasses.asdict(s), "sources": dict(sources or {})}
    models = [("base", base)] + ([("tuned", tuned)] if tuned is not None else [])
    if items:
        k_shots = list(shots[:s.k]) if s.k > 0 else []
        systems = [("base zero-shot", base, [])] + ([(f"base {len(k_shots)}-shot", base, k_shots)] if k_shots else [])
        systems += [("tuned", tuned, [])] if tuned is not None else []
        outputs, scores = {}, {}
        for name, model, few in systems:
            prompts = render_prompts(model.tokenizer, items, few)
            with _bar(len(items), f"{name}: generating", quiet) as bar:
                outputs[name] = generate_texts(model, prompts, max_new_tokens=s.max_new_tokens,
                                               batch_size=s.batch_size, on_batch=bar.update)
            scores[name] = score_generations(outputs[name], items, s)
        report["tasks"] = {"items": len(items), "shots": len(k_shots), "systems": scores,
                           "examples": [{"prompt": it.messages[-1]["content"], "reference": it.reference,
                                         **{name: outputs[name][i] for name in outputs}}
                                        for i, it in enumerate(items[:s.examples])],
                           "outputs": {name: outs for name, outs in outputs.items()}}
    if choices:
        mc = {}
        for name, model in models:
            with _bar(sum(len(c.choices) for c in choices), f"{name}: multiple choice", quiet) as bar:
                sc = multiple_choice(model, choices, batch_size=s.batch_size, on_batch=bar.update)
            mc[name] = {"acc": _interval(sc.acc, s, 100.0), "acc_norm": _interval(sc.acc_norm, s, 100.0)}
        report["multiple_choice"] = {"items": len(choices), "systems": mc}
    if texts:
        report["perplexity"] = {"texts": len(texts), "systems": {
            name: _perplexity_of(model, texts, s, f"{name}: perplexity", quiet) for name, model in models}}
    if forgetting and tuned is not None:
        general = [general_text()]
        b = _perplexity_of(base, general, s, "base: general-text perplexity", quiet)
        t = _perplexity_of(tuned, general, s, "tuned: general-text perplexity", quiet)
        report["forgetting"] = {"text": f"jaxft/eval/texts/{GENERAL_TEXT}", "tokens": b["tokens"],
                                **forgetting_verdict(b["perplexity"], t["perplexity"], s.threshold)}
    return report
