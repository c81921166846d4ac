"""Write the quickstart task: dates written in many styles, normalised to ISO 8601 (YYYY-MM-DD).

Usage: python scripts/make_quickstart_data.py [--out data/quickstart] [--train 1800] [--eval 150] [--seed 0]

Every record is one chat turn, {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}; the assistant's
answer is exactly the ISO date (10 characters). The generator uses only the standard library and a seeded
`random.Random`, so running it twice writes identical files. Train and eval are disjoint by calendar date (not
only by text): no date of the eval split appears in train, in any style.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST_YEAR, LAST_YEAR = 1950, 2049

# Short instructions: SmolLM2's template already adds a ~20-token system prompt, so the user turn stays small.
PROMPTS = [
    "Convert to ISO 8601: {d}",
    "ISO date for: {d}",
    "Write {d} as YYYY-MM-DD.",
    "Normalize this date: {d}",
    "Date: {d}\nISO format?",
]


def _ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _styles(d: datetime.date) -> list[str]:
    """All the surface forms of one date; every one names the month or orders the fields unambiguously."""
    month, mon = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    wd = WEEKDAYS[d.weekday()]
    return [
        f"{month} {d.day}, {d.year}",
        f"{d.day} {month} {d.year}",
        f"{mon} {d.day}, {d.year}",
        f"{d.day} {mon} {d.year}",
        f"{mon}. {d.day} {d.year}",
        f"the {_ordinal(d.day)} of {month}, {d.year}",
        f"{month} {_ordinal(d.day)}, {d.year}",
        f"{wd}, {month} {d.day}, {d.year}",
        f"{wd[:3]} {d.day} {mon} {d.year}",
        f"{d.day:02d}-{mon}-{d.year}",
        f"{month.upper()} {d.day} {d.year}",
        f"{d.year}, {month} {d.day}",
        f"{d.year} {mon} {d.day:02d}",
        f"{d.year}/{d.month}/{d.day}",
        f"{d.year}.{d.month:02d}.{d.day:02d}",
    ]


def _record(rng: random.Random, d: datetime.date) -> dict:
    """One chat record for date `d` in a random style and instruction."""
    text = rng.choice(PROMPTS).format(d=rng.choice(_styles(d)))
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": d.isoformat()}]}


def make_splits(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw `n_train + n_eval` distinct dates, give the first `n_eval` to eval and the rest to train."""
    rng = random.Random(seed)
    first = datetime.date(FIRST_YEAR, 1, 1).toordinal()
    last = datetime.date(LAST_YEAR, 12, 31).toordinal()
    if n_train + n_eval > last - first + 1:
        raise ValueError(f"--train {n_train} + --eval {n_eval} exceeds the {last - first + 1} dates in range; ask for fewer")
    ordinals = rng.sample(range(first, last + 1), n_train + n_eval)
    dates = [datetime.date.fromordinal(o) for o in ordinals]
    eval_set = [_record(rng, d) for d in dates[:n_eval]]
    train_set = [_record(rng, d) for d in dates[n_eval:]]
    return train_set, eval_set


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "quickstart"))
    parser.add_argument("--train", type=int, default=1800)
    parser.add_argument("--eval", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_set, eval_set = make_splits(args.train, args.eval, args.seed)
    os.makedirs(args.out, exist_ok=True)
    _write_jsonl(os.path.join(args.out, "train.jsonl"), train_set)
    _write_jsonl(os.path.join(args.out, "eval.jsonl"), eval_set)
    print(f"wrote {len(train_set)} train and {len(eval_set)} eval records to {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
