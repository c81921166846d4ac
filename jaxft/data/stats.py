"""Counts of what `prepare` read, kept, dropped and packed, per source and in total, with a readable summary."""

from __future__ import annotations

import dataclasses

_SHOWN = 5  # malformed record numbers kept per source for the report


@dataclasses.dataclass
class SourceStats:
    """One source's journey. Every record read ends in exactly one of: malformed, duplicates, decontaminated,
    to_eval (carved into the eval split), too_long (dropped by truncation) or kept; `truncated` counts the kept
    examples that were cut from the left. `drawn` is how many examples mixing took (repeats included); `tokens` and
    `trained_tokens` count the drawn examples."""

    where: str
    path: str
    format: str = "auto"
    unit: str = "record"
    read: int = 0
    malformed: int = 0
    malformed_first: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    duplicates: int = 0
    decontaminated: int = 0
    to_eval: int = 0
    too_long: int = 0
    truncated: int = 0
    kept: int = 0
    drawn: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    carved: bool = False  # the eval split carved from train: its records were counted as read by the train sources

    def add_malformed(self, number: int, reason: str) -> None:
        self.malformed += 1
        if len(self.malformed_first) < _SHOWN:
            self.malformed_first.append((number, reason))

    @property
    def malformed_numbers(self) -> list[int]:
        """The first (up to 5) malformed line numbers (JSONL) or record numbers, ascending."""
        return sorted(n for n, _ in self.malformed_first)

    def line(self) -> str:
        parts = [f"read {self.read}", f"kept {self.kept}"]
        if self.drawn != self.kept:
            parts.append(f"drawn {self.drawn}")
        if self.malformed:
            first = ", ".join(f"{n} ({r})" for n, r in sorted(self.malformed_first))
            more = ", ..." if self.malformed > len(self.malformed_first) else ""
            parts.append(f"malformed {self.malformed} at {self.unit}s {first}{more}")
        for name in ("duplicates", "decontaminated", "to_eval", "too_long", "truncated"):
            if getattr(self, name):
                parts.append(f"{name.replace('_', ' ')} {getattr(self, name)}")
        return f"  {self.where} {self.path} [{self.format}]: " + ", ".join(parts)


@dataclasses.dataclass
class SplitTotals:
    """Totals over one split's packed examples."""

    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    rows: int = 0
    efficiency: float = 0.0


@dataclasses.dataclass
class Stats:
    """Everything `prepare` counted. `summary()` is what `python -m jaxft.data inspect` prints."""

    seq_len: int
    packing: bool
    sources: list[SourceStats] = dataclasses.field(default_factory=list)
    train: SplitTotals = dataclasses.field(default_factory=SplitTotals)
    eval: SplitTotals = dataclasses.field(default_factory=SplitTotals)
    eval_generation: int = 0

    def _sum(self, name: str, prefix: str = "") -> int:
        return sum(getattr(s, name) for s in self.sources if s.where.startswith(prefix))

    @property
    def records_read(self) -> int:
        return sum(s.read for s in self.sources if not s.carved)

    @property
    def malformed(self) -> int:
        return self._sum("malformed")

    @property
    def duplicates(self) -> int:
        return self._sum("duplicates")

    @property
    def decontaminated(self) -> int:
        return self._sum("decontaminated")

    @property
    def too_long(self) -> int:
        return self._sum("too_long")

    @property
    def truncated(self) -> int:
        return self._sum("truncated")

    @property
    def kept(self) -> int:
        return self._sum("kept")

    def summary(self) -> str:
        """A few lines: per-source counts, then the train and eval totals with packing efficiency."""
        lines = [f"data: seq_len {self.seq_len}, packing {'best-fit decreasing' if self.packing else 'off (one example per row)'}"]
        lines += [s.line() for s in self.sources]
        lines.append(
            f"records: read {self.records_read}, kept {self.kept}; dropped: malformed {self.malformed}, "
            f"duplicates {self.duplicates}, decontaminated {self.decontaminated}, too long {self.too_long}; "
            f"truncated (left) {self.truncated}"
        )
        for name, t in (("train", self.train), ("eval", self.eval)):
            if t.examples or name == "train":
                share = t.trained_tokens / t.tokens if t.tokens else 0.0
                lines.append(
                    f"{name}: {t.examples} examples, {t.tokens} tokens, {t.trained_tokens} trained ({share:.1%}); "
                    f"{t.rows} rows of {self.seq_len}, packing efficiency {t.efficiency:.1%}"
                )
        if self.eval.examples:
            lines.append(f"eval generation: {self.eval_generation} prompts ending in an assistant turn")
        return "\n".join(lines)
