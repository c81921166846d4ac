"""`python -m jaxft.data inspect CONFIG.yaml [dotted.key=value ...]`: show what the trainer will train on.

Reads the trainer's YAML (only its `model.path` and `data` sections), loads the tokenizer, runs `prepare`, prints one
example with its trained tokens marked (green on a terminal, `[[...]]` otherwise) and the statistics.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from jaxft.data.config import data_config_from_dict
from jaxft.data.pipeline import prepare
from jaxft.data.sources import check_source_paths
from jaxft.errors import ConfigError, JaxftError
from jaxft.io.tokenizer import load_tokenizer
from jaxft.schema import apply_overrides, load_yaml

_GREEN, _RESET = "\x1b[1;32m", "\x1b[0m"


def render_marked(tokenizer, ids: np.ndarray, mask: np.ndarray, color: bool) -> str:
    """The decoded tokens, each maximal run of trained tokens (mask True) wrapped in color or in [[ ]]."""
    out = []
    start = 0
    n = len(ids)
    while start < n:
        end = start
        while end < n and mask[end] == mask[start]:
            end += 1
        text = tokenizer.decode([int(t) for t in ids[start:end]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if mask[start]:
            text = f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"
        out.append(text)
        start = end
    return "".join(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxft.data",
        description="Inspect the data pipeline of a jaxft training config.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "inspect",
        help="render one example with its trained tokens marked, and print the data statistics",
        description=(
            "Load the tokenizer of model.path and prepare the data section of CONFIG exactly as the trainer does; "
            "print one example with the trained tokens marked ([[...]] or green on a terminal) and the statistics: "
            "records read and kept, tokens and trained tokens, truncated, dropped (malformed with line numbers, "
            "duplicates, decontaminated), rows after packing and packing efficiency."
        ),
    )
    p.add_argument("config", metavar="CONFIG.yaml", help="the trainer's YAML config (sections model and data are used)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="overrides, e.g. data.seq_len=512 model.path=DIR")
    p.add_argument("--split", choices=("train", "eval"), default="train", help="which split's example to show (default train)")
    p.add_argument("--example", type=int, default=0, metavar="K", help="show the K-th example of the split (default 0)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="mark trained tokens with color (auto: when stdout is a terminal)")
    return parser


def _inspect(args) -> int:
    raw = apply_overrides(load_yaml(args.config), args.overrides)
    model = raw.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("path"), str):
        raise ConfigError(f"{args.config}: model.path is missing; add `model: {{path: smollm2-135m-instruct}}` or a model directory")
    cfg = data_config_from_dict(raw.get("data"), "data")
    check_source_paths(cfg.train, "data.train")  # before the slow tokenizer load
    check_source_paths(cfg.eval, "data.eval")
    tokenizer = load_tokenizer(model["path"])
    prepared = prepare(cfg, tokenizer)

    examples = prepared.train if args.split == "train" else prepared.eval
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    if not examples:
        print(f"no {args.split} examples")
    elif not 0 <= args.example < len(examples):
        raise ConfigError(f"--example {args.example}: the {args.split} split has {len(examples)} examples; pick 0..{len(examples) - 1}")
    else:
        ex = examples[args.example]
        src = next((s for s in prepared.stats.sources if s.where == f"data.{args.split}[{ex.source}]"), None)
        origin = f"{src.path} {src.unit} {ex.number}" if src else f"record {ex.number}"
        marks = "green" if color else "[[...]]"
        print(f"{args.split} example {args.example} ({origin}): {len(ex)} tokens, {ex.trained} trained (marked {marks})")
        print(render_marked(tokenizer, ex.ids, ex.mask, color))
        print()
    print(prepared.stats.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m jaxft.data`; returns the exit status (2 with a one-line message on a bad config)."""
    args = _parser().parse_args(argv)
    try:
        return _inspect(args)
    except (JaxftError, ValueError, OSError) as e:  # every input error is a JaxftError; the others are a backstop
        print(f"error: {e}", file=sys.stderr)
        return 2
