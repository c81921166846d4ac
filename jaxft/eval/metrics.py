"""Task metrics on generated text against a reference, and percentile-bootstrap confidence intervals.

Every metric scores one (output, reference) pair in [0, 1] (chrF in [0, 100]), so a task's score is the mean over its
items and its uncertainty is a bootstrap over items:

- exact: `output.strip() == reference.strip()` (what the trainer reports as exact match).
- normalised: equality after SQuAD's answer normalisation (lowercase, punctuation and the articles a/an/the removed,
  whitespace runs collapsed).
- contains: the normalised reference occurs in the normalised output.
- regex: with a capturing group, the first group of the first match in the output, normalised, equals the normalised
  reference; without a group, whether the pattern matches anywhere in the output (a format check).
- json_field: the value at a dotted path (`a.b.0`) of the JSON object in the output equals the value at that path in
  the reference (or the reference itself, when the reference is not JSON).
- chrF: Popović's character n-gram F-score (orders 1-6, beta 2, whitespace removed), sacreBLEU's default; per item
  (sentence chrF) and over the corpus (statistics summed over items before the F-score, as sacreBLEU's corpus score).
"""

from __future__ import annotations

import collections
import json
import re
import string
from typing import Any, Sequence

import numpy as np

CHRF_ORDER, CHRF_BETA = 6, 2.0
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's `normalize_answer`: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact(output: str, reference: str) -> float:
    return float(output.strip() == reference.strip())


def normalised(output: str, reference: str) -> float:
    return float(normalize_answer(output) == normalize_answer(reference))


def contains(output: str, reference: str) -> float:
    """1 when the normalised reference is a substring of the normalised output (an empty reference never counts)."""
    ref = normalize_answer(reference)
    return float(bool(ref) and ref in normalize_answer(output))


def regex_match(output: str, reference: str, pattern: re.Pattern | str) -> float:
    """See the module docstring: extract-and-compare with a capturing group, a format check without one."""
    pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
    m = pattern.search(output)
    if m is None:
        return 0.0
    if pattern.groups == 0:
        return 1.0
    got = m.group(1)
    return float(got is not None and normalize_answer(got) == normalize_answer(reference))


def _json_object(text: str) -> Any:
    """The JSON value of `text`, or of its outermost `{...}` span (models often wrap JSON in prose or code fences);
    raises ValueError when there is none."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            raise ValueError("no JSON object") from None
        return json.loads(text[start:end + 1])


def _field(value: Any, path: Sequence[str]) -> Any:
    for key in path:
        if isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            raise KeyError(key)
    return value


def json_field_match(output: str, reference: str, field: str) -> float:
    """1 when the output's JSON has `field` (dotted path) equal to the reference's (a JSON reference is read at the
    same path; a plain reference is compared as text, stripped)."""
    path = field.split(".")
    try:
        got = _field(_json_object(output), path)
    except (ValueError, KeyError):
        return 0.0
    try:
        want = _field(_json_object(reference), path)
    except (ValueError, KeyError):
        return float(str(got).strip() == reference.strip())
    return float(got == want)


def _char_ngrams(text: str, order: int) -> list[collections.Counter]:
    text = "".join(text.split())  # sacreBLEU's default: whitespace is not part of any n-gram
    return [collections.Counter(text[i:i + n] for i in range(len(text) - n + 1)) for n in range(1, order + 1)]


def chrf_statistics(output: str, reference: str, order: int = CHRF_ORDER) -> np.ndarray:
    """`[order, 3]` int64 counts per n-gram order n = 1..order: (output n-grams, reference n-grams, matched
    n-grams = sum over n-grams of min(count in output, count in reference))."""
    hyp, ref = _char_ngrams(output, order), _char_ngrams(reference, order)
    return np.asarray([(sum(h.values()), sum(r.values()), sum((h & r).values())) for h, r in zip(hyp, ref)],
                      np.int64)


def chrf_from_statistics(stats: np.ndarray, beta: float = CHRF_BETA) -> float:
    """chrF in [0, 100] from `[order, 3]` statistics: precision and recall averaged over the orders that have both
    output and reference n-grams, then F_beta = (1 + b^2) P R / (b^2 P + R) (sacreBLEU 2.x's definition)."""
    precisions, recalls = [], []
    for n_hyp, n_ref, n_match in np.asarray(stats):
        if n_hyp > 0 and n_ref > 0:
            precisions.append(n_match / n_hyp)
            recalls.append(n_match / n_ref)
    if not precisions:
        return 0.0
    p, r = float(np.mean(precisions)), float(np.mean(recalls))
    if p + r == 0:
        return 0.0
    b2 = beta * beta
    return 100.0 * (1 + b2) * p * r / (b2 * p + r)


def chrf(output: str, reference: str) -> float:
    """Sentence-level chrF (0-100)."""
    return chrf_from_statistics(chrf_statistics(output, reference))


def corpus_chrf(outputs: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (0-100): the items' statistics summed, then one F-score."""
    if not outputs:
        return 0.0
    return chrf_from_statistics(sum(chrf_statistics(o, r) for o, r in zip(outputs, references)))


def score_items(outputs: Sequence[str], references: Sequence[str], *, regex: str | None = None,
                item_regex: Sequence[str | None] | None = None, json_field: str | None = None) -> dict[str, np.ndarray]:
    """Per-item scores `{metric: float64[N]}` of every metric that applies: exact, normalised, contains, chrf
    always; regex when `regex` (one pattern for all) or `item_regex` (a pattern per item; None falls back to
    `regex`) is given; json_field when `json_field` is given."""
    out = {
        "exact": np.asarray([exact(o, r) for o, r in zip(outputs, references)], np.float64),
        "normalised": np.asarray([normalised(o, r) for o, r in zip(outputs, references)], np.float64),
        "contains": np.asarray([contains(o, r) for o, r in zip(outputs, references)], np.float64),
        "chrf": np.asarray([chrf(o, r) for o, r in zip(outputs, references)], np.float64),
    }
    patterns = list(item_regex) if item_regex is not None else [None] * len(outputs)
    if regex is not None or any(p is not None for p in patterns):
        compiled = {p: re.compile(p) for p in set(patterns) | {regex} if p is not None}
        out["regex"] = np.asarray([regex_match(o, r, compiled[p if p is not None else regex])
                                   if (p if p is not None else regex) is not None else 0.0
                                   for o, r, p in zip(outputs, references, patterns)], np.float64)
    if json_field is not None:
        out["json_field"] = np.asarray([json_field_match(o, r, json_field) for o, r in zip(outputs, references)],
                                       np.float64)
    return out


def bootstrap_ci(scores: Sequence[float], *, resamples: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `scores` and its percentile-bootstrap interval at `level` (resampling items
    with replacement `resamples` times from `numpy.random.default_rng(seed)`). One item gives (x, x, x)."""
    x = np.asarray(scores, np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one score")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(x.mean()), float(low), float(high)
