"""`prepare(cfg, tokenizer)`: sources -> records -> conversations -> tokens with loss masks -> mixed, packed rows.

The order of the steps, each counted in `Stats`:
 1. check every path (a missing file fails before any file is read); read every source; resolve `format: auto`;
 2. parse records; a malformed one is skipped and counted with its line/record number (`on_malformed: fail` raises);
 3. dedup train across all train sources (first occurrence kept), and eval within eval;
 4. the eval split: the eval sources, or `eval_size`/`eval_fraction` records carved from the deduplicated train
    records by `numpy.random.default_rng(seed).permutation`;
 5. decontaminate: drop train records equal (after whitespace normalisation) to an eval record;
 6. tokenize with the chat template and loss masks (`jaxft.data.render`); a conversation the template cannot render
    counts as malformed; then truncate (`drop` or `left`);
 7. mix the train sources (`jaxft.data.mixing`) and pack train and eval rows (`jaxft.data.packing`).
Every error that a config or a dataset can cause (missing file, unknown format, no template, an eval split larger
than the data, a source with no usable record) is raised by this function, before a model is touched.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from jaxft.data.batches import Batches, eval_batches
from jaxft.data.config import DataConfig, SourceConfig
from jaxft.data.formats import Conversation, detect_format, parse_record
from jaxft.data.mixing import mix
from jaxft.data.packing import efficiency, one_per_row, pack_bfd
from jaxft.data.render import Example, Renderer, truncate
from jaxft.data.sources import check_source_paths, read_source
from jaxft.data.stats import SourceStats, SplitTotals, Stats
from jaxft.errors import ConfigError, FileFormatError


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The result of `prepare`.

    train: the mixed train examples (repeats included); train_rows: their packed rows (tuples of indices into train).
    eval, eval_rows: the same for the eval split (never mixed nor shuffled).
    eval_generation: (prompt_ids int32 [P], reference str) for every eval example that ends in an assistant turn:
      the prompt is everything up to and including the generation prompt, the reference the final assistant content.
    """

    train: list[Example]
    eval: list[Example]
    train_rows: list[tuple[int, ...]]
    eval_rows: list[tuple[int, ...]]
    eval_generation: list[tuple[np.ndarray, str]]
    stats: Stats
    seq_len: int
    pad_id: int

    def train_batches(self, batch_size: int, seed: int = 0) -> Batches:
        """Resumable, per-epoch shuffled batches of the train rows (see `Batches`)."""
        return Batches(self.train, self.train_rows, batch_size, self.seq_len, self.pad_id, seed)

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """The eval rows in order; the last batch padded with empty rows."""
        return eval_batches(self.eval, self.eval_rows, batch_size, self.seq_len, self.pad_id)


def _malformed(cfg: DataConfig, st: SourceStats, number: int, reason: str) -> None:
    if cfg.on_malformed == "fail":
        raise FileFormatError(f"{st.where}: {st.path} {st.unit} {number}: {reason}; fix the record or set "
                              "data.on_malformed: skip")
    st.add_malformed(number, reason)


def _load(cfg: DataConfig, src: SourceConfig, index: int, where: str) -> tuple[list[Conversation], SourceStats]:
    raw = read_source(src, where)
    fmt = src.format if src.format != "auto" else detect_format(raw.columns, f"{where} {src.path}")
    st = SourceStats(where=where, path=src.path, format=fmt, unit=raw.unit, read=len(raw.records))
    convs = []
    for number, value in raw.records:
        conv = value if isinstance(value, str) else parse_record(value, fmt, index, number)
        if isinstance(conv, str):
            _malformed(cfg, st, number, conv)
        else:
            convs.append(conv)
    if not convs:
        first = f"; first problems: {'; '.join(f'{st.unit} {n}: {r}' for n, r in st.malformed_first[:2])}" if st.malformed else ""
        raise ConfigError(f"{where}: {src.path}: no usable record ({st.read} read, {st.malformed} malformed){first}; check the file and its format ({fmt})")
    return convs, st


def _dedup(sets: list[list[Conversation]], stats: list[SourceStats]) -> list[list[Conversation]]:
    seen: set[str] = set()
    out = []
    for convs, st in zip(sets, stats):
        kept = []
        for c in convs:
            k = c.key()
            if k in seen:
                st.duplicates += 1
            else:
                seen.add(k)
                kept.append(c)
        out.append(kept)
    return out


def _carve(cfg: DataConfig, sets: list[list[Conversation]], stats: list[SourceStats]) -> tuple[list[list[Conversation]], list[Conversation]]:
    total = sum(len(s) for s in sets)
    k = cfg.eval_size if cfg.eval_size else max(1, int(round(cfg.eval_fraction * total)))
    what = f"eval_size={cfg.eval_size}" if cfg.eval_size else f"eval_fraction={cfg.eval_fraction} ({k} records)"
    if k >= total:
        raise ConfigError(
            f"data.{what}: the train sources hold only {total} usable records (after malformed and duplicates), "
            "leaving nothing to train on; lower it or add data"
        )
    chosen = set(np.random.default_rng(cfg.seed).permutation(total)[:k].tolist())
    flat = [(i, c) for i, s in enumerate(sets) for c in s]
    evals = [c for g, (_, c) in enumerate(flat) if g in chosen]
    rest: list[list[Conversation]] = [[] for _ in sets]
    for g, (i, c) in enumerate(flat):
        if g in chosen:
            stats[i].to_eval += 1
        else:
            rest[i].append(c)
    return rest, evals


def _tokenize(cfg: DataConfig, renderer: Renderer, convs: list[Conversation], st: SourceStats) -> list[Example]:
    chats = [c for c in convs if c.is_chat]
    texts = [c for c in convs if not c.is_chat]
    encoded: list[Example | str] = renderer.encode_chats(chats, cfg.loss_on) if chats else []
    encoded += renderer.encode_texts(texts) if texts else []
    out = []
    for c, ex in zip(chats + texts, encoded):
        if isinstance(ex, str):
            _malformed(cfg, st, c.number, ex)
            continue
        cut = truncate(ex, cfg.seq_len, cfg.truncation)
        if cut is None:
            st.too_long += 1
        else:
            st.truncated += int(cut is not ex)
            out.append(cut)
    out.sort(key=lambda e: (e.source, e.number))  # file order, whatever the chat/text split did
    st.kept = len(out)
    return out


def _check_usable(examples: list[Example], st: SourceStats, cfg: DataConfig) -> None:
    if not examples:
        raise ConfigError(
            f"{st.where}: {st.path}: no usable record after filtering ({st.read} read, {st.malformed} malformed, "
            f"{st.duplicates} duplicates, {st.decontaminated} decontaminated, {st.to_eval} to eval, "
            f"{st.too_long} longer than seq_len={cfg.seq_len}); raise seq_len, set truncation: left or check the data"
        )


def _pack(examples: list[Example], cfg: DataConfig) -> tuple[list[tuple[int, ...]], SplitTotals]:
    lengths = [len(e) for e in examples]
    rows = pack_bfd(lengths, cfg.seq_len) if cfg.packing else one_per_row(len(examples))
    totals = SplitTotals(
        examples=len(examples),
        tokens=sum(lengths),
        trained_tokens=sum(e.trained for e in examples),
        rows=len(rows),
        efficiency=efficiency(lengths, rows, cfg.seq_len),
    )
    return rows, totals


@dataclasses.dataclass
class _Records:
    """The parsed, deduplicated, carved and decontaminated conversations of every source, with their stats."""

    train_sets: list[list[Conversation]]
    train_stats: list[SourceStats]
    eval_sets: list[list[Conversation]]
    eval_stats: list[SourceStats]


def _records(cfg: DataConfig) -> _Records:
    """Steps 1-5 of `prepare`: everything that needs no tokenizer."""
    check_source_paths(cfg.train, "data.train")
    check_source_paths(cfg.eval, "data.eval")
    loaded = [_load(cfg, s, i, f"data.train[{i}]") for i, s in enumerate(cfg.train)]
    eval_loaded = [_load(cfg, s, i, f"data.eval[{i}]") for i, s in enumerate(cfg.eval)]
    train_stats = [st for _, st in loaded]
    eval_stats = [st for _, st in eval_loaded]
    train_sets = [convs for convs, _ in loaded]
    eval_sets = [convs for convs, _ in eval_loaded]
    if cfg.dedup:
        train_sets = _dedup(train_sets, train_stats)
        eval_sets = _dedup(eval_sets, eval_stats)
    if not cfg.eval and (cfg.eval_size or cfg.eval_fraction):
        train_sets, carved = _carve(cfg, train_sets, train_stats)
        eval_stats = [SourceStats(where="data.eval", path="(carved from train)", format="mixed", read=len(carved), carved=True)]
        eval_sets = [carved]
    if cfg.decontaminate and eval_sets:
        eval_keys = {c.key() for s in eval_sets for c in s}
        for i, (convs, st) in enumerate(zip(train_sets, train_stats)):
            train_sets[i] = [c for c in convs if c.key() not in eval_keys]
            st.decontaminated = len(convs) - len(train_sets[i])
    for convs, st in zip(train_sets, train_stats):
        if not convs:
            _check_usable([], st, cfg)
    return _Records(train_sets, train_stats, eval_sets, eval_stats)


def check_sources(cfg: DataConfig) -> list[SourceStats]:
    """Read and parse every source of `cfg` without a tokenizer (for `python -m jaxft.train --check`): the paths
    exist, every file is readable (UTF-8, JSON), formats are detected, records parse (`on_malformed: fail` raises
    on the first bad one), and the eval split fits in the data (`eval_size` / `eval_fraction` leave train records;
    decontamination leaves some). Raises what `prepare` would raise for these; returns the per-source stats
    (read, malformed, duplicates, to_eval, decontaminated; `kept` = records that reach tokenization). What needs
    the tokenizer (the chat template, lengths against seq_len, packing) is checked by `prepare`."""
    rec = _records(cfg)
    for convs, st in zip(rec.train_sets + rec.eval_sets, rec.train_stats + rec.eval_stats):
        st.kept = len(convs)
    return rec.train_stats + rec.eval_stats


def prepare(cfg: DataConfig, tokenizer) -> Prepared:
    """Read, filter, tokenize, mix and pack the data of `cfg` with `tokenizer` (an HF tokenizer)."""
    renderer = Renderer(tokenizer, cfg.chat_template)
    rec = _records(cfg)
    for st in rec.train_stats + rec.eval_stats:
        if st.format not in ("text", "mixed"):  # a carved eval split ("mixed") holds train records, checked above
            renderer.require_template(f"{st.where} {st.path} (format {st.format})")
    train_sets, train_stats, eval_sets, eval_stats = rec.train_sets, rec.train_stats, rec.eval_sets, rec.eval_stats

    per_source = [_tokenize(cfg, renderer, convs, st) for convs, st in zip(train_sets, train_stats)]
    for examples, st in zip(per_source, train_stats):
        _check_usable(examples, st, cfg)
    eval_per_source = [_tokenize(cfg, renderer, convs, st) for convs, st in zip(eval_sets, eval_stats)]
    for examples, st in zip(eval_per_source, eval_stats):
        _check_usable(examples, st, cfg)
    eval_examples = [e for examples in eval_per_source for e in examples]

    weights = [s.weight for s in cfg.train]
    train, counts = mix(per_source, weights, cfg.mixing, cfg.temperature, cfg.seed)
    for st, n in zip(train_stats, counts):
        st.drawn = n
    for ex in train:
        train_stats[ex.source].tokens += len(ex)
        train_stats[ex.source].trained_tokens += ex.trained
    for examples, st in zip(eval_per_source, eval_stats):
        st.drawn = len(examples)
        st.tokens = sum(len(e) for e in examples)
        st.trained_tokens = sum(e.trained for e in examples)

    train_rows, train_totals = _pack(train, cfg)
    eval_rows, eval_totals = _pack(eval_examples, cfg)
    generation = [(e.ids[: e.prompt_end].copy(), e.reference) for e in eval_examples if e.prompt_end >= 0]
    stats = Stats(
        seq_len=cfg.seq_len,
        packing=cfg.packing,
        sources=train_stats + eval_stats,
        train=train_totals,
        eval=eval_totals,
        eval_generation=len(generation),
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return Prepared(train, eval_examples, train_rows, eval_rows, generation, stats, cfg.seq_len, int(pad_id))
