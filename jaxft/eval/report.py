"""The side-by-side report of `jaxft.eval.compare` as `report.json` (every number and output), `report.md` (tables)
and `report.html` (the tables and the plots, PNGs embedded as base64, so the page is one self-contained file)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Any

from matplotlib.figure import Figure

from jaxft.errors import OutputExistsError

FILES = ("report.json", "report.md", "report.html")
_LABELS = {"exact": "exact match (%)", "normalised": "normalised match (%)", "contains": "contains (%)",
           "regex": "regex match (%)", "json_field": "JSON field match (%)", "chrf": "chrF (0-100)",
           "acc": "acc (%)", "acc_norm": "acc_norm (%)"}


def _ci(v: dict[str, float]) -> str:
    return f"{v['mean']:.1f} [{v['low']:.1f}, {v['high']:.1f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[list[str]]:
    return [header] + rows


def _tables(report: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    """(title, rows with a header row) of every part of the report, shared by markdown and HTML."""
    out = []
    s = report["settings"]
    if "tasks" in report:
        t = report["tasks"]
        names = list(t["systems"])
        metric_names = [m for m in t["systems"][names[0]] if m != "corpus_chrf"]
        rows = [[_LABELS.get(m, m)] + [_ci(t["systems"][n][m]) for n in names] for m in metric_names]
        rows.append(["corpus chrF"] + [f"{t['systems'][n]['corpus_chrf']:.1f}" for n in names])
        out.append((f"Generation: {t['items']} items, greedy, up to {s['max_new_tokens']} new tokens (mean [95% CI, "
                    f"percentile bootstrap, {s['resamples']} resamples, seed {s['seed']}])",
                    _table(["metric"] + names, rows)))
        ex_names = [n for n in names]
        out.append((f"Examples (the first {len(t['examples'])})",
                    _table(["prompt", "reference"] + ex_names,
                           [[e["prompt"], e["reference"]] + [e[n] for n in ex_names] for e in t["examples"]])))
    if "multiple_choice" in report:
        m = report["multiple_choice"]
        names = list(m["systems"])
        rows = [[_LABELS[k]] + [_ci(m["systems"][n][k]) for n in names] for k in ("acc", "acc_norm")]
        out.append((f"Multiple choice: {m['items']} items, log-likelihood of each choice (acc_norm divides by the "
                    "choice's UTF-8 bytes)", _table(["metric"] + names, rows)))
    if "perplexity" in report:
        p = report["perplexity"]
        names = list(p["systems"])
        rows = [["perplexity"] + [f"{p['systems'][n]['perplexity']:.3f}" for n in names],
                ["scored tokens"] + [str(p["systems"][n]["tokens"]) for n in names]]
        out.append((f"Perplexity: {p['texts']} texts, windows of {s['window']} tokens, stride {s['stride']}",
                    _table(["", *names], rows)))
    if "forgetting" in report:
        f = report["forgetting"]
        rows = [["base", f"{f['base']:.3f}"], ["tuned", f"{f['tuned']:.3f}"],
                ["increase", f"{100 * f['increase']:+.2f}%"], ["threshold", f"{100 * f['threshold']:g}%"]]
        out.append((f"Forgetting probe ({f['text']}, {f['tokens']} tokens): {f['verdict']}",
                    _table(["perplexity", "value"], rows)))
    return out


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def markdown(report: dict[str, Any]) -> str:
    """The report's tables as GitHub-flavoured markdown."""
    lines = ["# jaxft evaluation", ""]
    lines += [f"- {k}: `{v}`" for k, v in report.get("sources", {}).items()] + [""]
    for title, rows in _tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(_md_cell(c) for c in rows[0]) + " |",
                  "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows[1:]]
        lines.append("")
    return "\n".join(lines)


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _bars(title: str, groups: list[str], systems: dict[str, list[dict[str, float]]], ylabel: str,
          intervals: bool = True, line: tuple[float, str] | None = None) -> str:
    """Grouped bars (one group per metric, one bar per system), with 95% CI error bars when `intervals`, and a
    dashed horizontal `line = (y, label)` when given; base64 PNG."""
    fig = Figure(figsize=(max(5.0, 1.6 * len(groups) * max(1, len(systems)) / 2), 3.6), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(systems))
    for j, (name, vals) in enumerate(systems.items()):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(groups))]
        means = [v["mean"] for v in vals]
        err = [[v["mean"] - v["low"] for v in vals], [v["high"] - v["mean"] for v in vals]] if intervals else None
        ax.bar(xs, means, width, yerr=err if intervals else None, capsize=3, label=name)
    if line is not None:
        ax.axhline(line[0], color="k", linestyle="--", linewidth=1, label=line[1])
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over a bar
    return _png(fig)


def plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of each plot: task metrics, multiple choice, perplexity and the forgetting probe."""
    out = []
    if "tasks" in report:
        sys_ = report["tasks"]["systems"]
        groups = [m for m in next(iter(sys_.values())) if m != "corpus_chrf"]
        out.append(("Generation metrics with 95% bootstrap intervals",
                    _bars("generation", [_LABELS.get(g, g) for g in groups],
                          {n: [v[g] for g in groups] for n, v in sys_.items()}, "score")))
    if "multiple_choice" in report:
        sys_ = report["multiple_choice"]["systems"]
        out.append(("Multiple-choice accuracy with 95% bootstrap intervals",
                    _bars("multiple choice", ["acc", "acc_norm"],
                          {n: [v["acc"], v["acc_norm"]] for n, v in sys_.items()}, "%")))
    ppl = {}
    if "perplexity" in report:
        ppl["eval texts"] = {n: v["perplexity"] for n, v in report["perplexity"]["systems"].items()}
    if "forgetting" in report:
        f = report["forgetting"]
        ppl["general English"] = {"base": f["base"], "tuned": f["tuned"]}
    if ppl:
        groups = list(ppl)
        names = sorted({n for g in ppl.values() for n in g}, key=["base", "tuned"].index)
        f = report.get("forgetting")
        line = None
        if f:
            line = (f["base"] * (1 + f["threshold"]),
                    f"general-English forgetting threshold (base +{100 * f['threshold']:g}%)")
        out.append(("Perplexity (lower is better)",
                    _bars("perplexity", groups, {n: [{"mean": ppl[g].get(n, 0.0)} for g in groups] for n in names},
                          "perplexity", intervals=False, line=line)))
    return out


def html_page(report: dict[str, Any]) -> str:
    """One self-contained HTML page: sources, every table and the plots."""
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>jaxft evaluation</title><style>",
             "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:.3em .6em;vertical-align:top;white-space:pre-wrap}"
             "th{background:#eee}</style></head><body><h1>jaxft evaluation</h1><ul>"]
    parts += [f"<li>{esc(k)}: <code>{esc(str(v))}</code></li>" for k, v in report.get("sources", {}).items()]
    parts.append("</ul>")
    for title, rows in _tables(report):
        parts.append(f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(str(c))}</th>" for c in rows[0])
                     + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows[1:]]
        parts.append("</table>")
    for caption, png in plots(report):
        parts.append(f"<figure><img alt='{esc(caption)}' src='data:image/png;base64,{png}'>"
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def check_out_dir(out_dir: str, overwrite: bool = False) -> None:
    """Refuse (before any compute) to replace report files already in `out_dir` unless `overwrite`."""
    present = [f for f in FILES if os.path.exists(os.path.join(out_dir, f))]
    if present and not overwrite:
        raise OutputExistsError(f"{out_dir}: already holds {', '.join(present)}; pass --overwrite or another --out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputExistsError(f"{out_dir}: exists and is not a directory; pass another --out")


def write_report(report: dict[str, Any], out_dir: str) -> list[str]:
    """Write report.json, report.md and report.html into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f) for f in FILES]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(markdown(report))
    with open(paths[2], "w", encoding="utf-8") as f:
        f.write(html_page(report))
    return paths
