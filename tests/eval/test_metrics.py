"""Task metrics: SQuAD normalisation, exact / contains / regex / JSON-field matches, chrF against hand-worked values
from the chrF definition (Popović 2015; sacreBLEU 2.x's averaging) and against sacreBLEU itself, and the percentile
bootstrap against scipy's."""

import numpy as np
import pytest

from jaxft.eval import metrics


def test_squad_normalisation():
    assert metrics.normalize_answer("The  Cat, sat!") == "cat sat"
    assert metrics.normalize_answer("An apple a day") == "apple day"
    assert metrics.normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert metrics.normalised("Paris.", "paris") == 1.0 and metrics.exact("Paris.", "paris") == 0.0
    assert metrics.exact("  2021-03-05\n", "2021-03-05") == 1.0


def test_contains_regex_json():
    assert metrics.contains("I think it is the Eiffel Tower, in Paris.", "Eiffel tower") == 1.0
    assert metrics.contains("London", "Paris") == 0.0 and metrics.contains("anything", "") == 0.0
    date = r"(\d{4}-\d{2}-\d{2})"
    assert metrics.regex_match("Answer: 2021-03-05.", "2021-03-05", date) == 1.0
    assert metrics.regex_match("Answer: 2021-03-06.", "2021-03-05", date) == 0.0
    assert metrics.regex_match("2021-03-05", "ignored", r"^\d{4}-\d{2}-\d{2}$") == 1.0  # no group: a format check
    assert metrics.regex_match("5 March", "ignored", r"^\d{4}-\d{2}-\d{2}$") == 0.0
    out = 'Sure: ```json\n{"date": "2021-03-05", "n": 2, "tags": ["a", "b"]}\n```'
    assert metrics.json_field_match(out, '{"date": "2021-03-05"}', "date") == 1.0
    assert metrics.json_field_match(out, "2", "n") == 1.0  # a plain reference compares as text
    assert metrics.json_field_match(out, '{"tags": ["x", "b"]}', "tags.1") == 1.0
    assert metrics.json_field_match(out, '{"n": 3}', "n") == 0.0
    assert metrics.json_field_match("no json here", '{"n": 2}', "n") == 0.0
    assert metrics.json_field_match(out, '{"n": 2}', "missing") == 0.0


def test_chrf_hand_worked():
    # "ab" vs "abc": 1-grams P=2/2 R=2/3, 2-grams P=1/1 R=1/2, orders 3-6 have no hypothesis n-grams and do not count;
    # P=1, R=7/12, F2 = 5PR/(4P+R) = 7/11.
    assert metrics.chrf("ab", "abc") == pytest.approx(100 * 7 / 11, abs=1e-12)
    assert metrics.chrf("a b c", "abc") == pytest.approx(100.0, abs=1e-12)  # whitespace is not part of n-grams
    assert metrics.chrf("", "abc") == 0.0 and metrics.chrf("xyz", "abc") == 0.0
    # corpus: statistics summed first. ("ab","abc") + ("abc","abc"): P=1 at orders 1-3, R = 5/6, 3/4, 1/2 -> R=25/36,
    # F2 = 5R/(4+R) = 125/169 (the mean of the two sentence scores would be (63.6 + 100) / 2 = 81.8).
    assert metrics.corpus_chrf(["ab", "abc"], ["abc", "abc"]) == pytest.approx(100 * 125 / 169, abs=1e-12)


SENTENCES = [
    ("The cat sat on the mat.", "The cat is sitting on the mat."),
    ("2021-03-05", "2021-03-05"),
    ("Paris is the capital of France", "The capital of France is Paris."),
    ("", "nothing"),
    ("completely different words", "no overlap at all here"),
    ("Grüße aus München, schön!", "Viele Grüße aus München."),
    ("a", "ab"),
    ("repeated repeated repeated", "repeated once"),
]


def test_chrf_equals_sacrebleu():
    """Sentence and corpus chrF equal sacreBLEU's CHRF() (defaults: char order 6, beta 2, no word n-grams). Both
    are float64 arithmetic on the same counts; measured difference 0 on these pairs, tolerance 1e-9."""
    sacrebleu = pytest.importorskip("sacrebleu", reason="sacreBLEU is the chrF reference (the test extra)")
    ref = sacrebleu.metrics.CHRF()
    for hyp, r in SENTENCES:
        assert metrics.chrf(hyp, r) == pytest.approx(ref.sentence_score(hyp, [r]).score, abs=1e-9), (hyp, r)
    hyps, refs = [h for h, _ in SENTENCES], [r for _, r in SENTENCES]
    assert metrics.corpus_chrf(hyps, refs) == pytest.approx(ref.corpus_score(hyps, [refs]).score, abs=1e-9)


def test_score_items_applies_metrics_by_request():
    outs, refs = ["Paris.", "2021-03-05", '{"a": 1}'], ["paris", "2021-03-05", '{"a": 1}']
    s = metrics.score_items(outs, refs)
    assert sorted(s) == ["chrf", "contains", "exact", "normalised"]
    assert s["exact"].tolist() == [0.0, 1.0, 1.0] and s["normalised"].tolist() == [1.0, 1.0, 1.0]
    s = metrics.score_items(outs, refs, regex=r"^\d", item_regex=[None, None, r"\{"], json_field="a")
    assert s["regex"].tolist() == [0.0, 1.0, 1.0] and s["json_field"].tolist() == [0.0, 0.0, 1.0]


def test_bootstrap_matches_scipy_percentile_interval():
    """Our percentile bootstrap against scipy.stats.bootstrap(method='percentile') on continuous scores: the two
    use different random streams, so they agree up to Monte Carlo error (measured at most 0.0023, on intervals about
    0.19 wide, over 6 data seeds with 20,000 resamples each; tolerance 0.01)."""
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is the bootstrap reference")
    for seed in range(3):
        x = np.random.default_rng(seed).uniform(0, 1, 40) ** 2
        mean, low, high = metrics.bootstrap_ci(x, resamples=20000, seed=seed)
        ref = scipy_stats.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95,
                                    random_state=np.random.default_rng(100 + seed)).confidence_interval
        assert mean == pytest.approx(x.mean())
        assert abs(low - ref.low) < 0.01 and abs(high - ref.high) < 0.01, (low, ref.low, high, ref.high)
        assert low < mean < high


def test_bootstrap_is_seeded():
    x = np.random.default_rng(0).uniform(size=30)
    assert metrics.bootstrap_ci(x, seed=3) == metrics.bootstrap_ci(x, seed=3)
    assert metrics.bootstrap_ci(x, seed=3) != metrics.bootstrap_ci(x, seed=4)
    assert metrics.bootstrap_ci([0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        metrics.bootstrap_ci([])
