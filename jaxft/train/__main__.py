"""`python -m jaxft.train CONFIG.yaml [dotted.key=value ...]`: supervised fine-tuning.

Examples:
  python -m jaxft.train configs/quickstart.yaml
  python -m jaxft.train configs/quickstart.yaml optim.lr=1e-4 train.steps=50 output_dir=runs/try2
  python -m jaxft.train configs/quickstart.yaml --check      # validate config and data (no weights, no compute)
  python -m jaxft.train --help-config                        # every config key: type, default, meaning

Re-running with the same config and output_dir resumes from the last checkpoint; a different config in an existing
output_dir is refused. SIGTERM or Ctrl-C saves a checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import sys

from jaxft import peft
from jaxft.data import check_sources
from jaxft.data.config import DataConfig
from jaxft.errors import JaxftError
from jaxft.schema import KeyDoc, describe, format_reference
from jaxft.train.config import METHODS, TrainConfig, load_config
from jaxft.train.loop import run
from jaxft.train.preflight import check

# The spec class of each `method.type` (method_spec in jaxft.train.config builds the same mapping inline).
METHOD_SPECS = {"lora": peft.LoraSpec, "dora": peft.DoraSpec, "ia3": peft.IA3Spec, "prompt": peft.PromptTuningSpec,
                "prefix": peft.PrefixTuningSpec, "houlsby": peft.HoulsbySpec, "bitfit": peft.BitFitSpec}

# Doc lines for keys whose own class does not document them yet, by dotted key or by `Class.field` (each is the
# `name: text.` line to move into that class's docstring; tests/test_docs.py fails once the docstring has it, so an
# entry here never outlives its need).
PENDING_DOCS = {
    "output_dir": "the run directory: config.yaml, checkpoints, metrics, exports and the summary; re-running with "
                  "the same config resumes there.",
    "optim.min_lr_ratio": "the learning rate the decay ends at, as a fraction of lr (0 = decay to zero).",
    "train.epochs": "passes over the train rows when steps is 0 (fractional allowed).",
    "train.grad_accum": "micro-batches per optimizer step (the effective batch is batch_size * grad_accum rows).",
    "train.seed": "the seed of initialisation, dropout and the batch order.",
    "_LowRankSpec.r": "the rank of the update B A.",
    "_LowRankSpec.alpha": "the scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA).",
    "_LowRankSpec.dropout": "dropout on the adapter's input (peft's lora_dropout).",
    "_LowRankSpec.target_modules": "the modules to adapt: a list of names (a module matches its name or .name "
                                   "suffix), a regular expression string, or `all-linear` (every linear layer but "
                                   "the head).",
    "_LowRankSpec.exclude_modules": "modules left out of target_modules (same forms).",
    "_LowRankSpec.use_rslora": "rank-stabilised scaling alpha / sqrt(r).",
    "_LowRankSpec.init": "the initialisation of A: `kaiming` uniform (peft's default) or `gaussian` (std 1/r).",
    "_LowRankSpec.rank_pattern": "per-module ranks overriding r: {module-name pattern: rank}.",
    "_LowRankSpec.alpha_pattern": "per-module alphas overriding alpha: {module-name pattern: alpha}.",
    "_LowRankSpec.layers_to_transform": "adapt only these layer indices (null = all layers).",
    "_LowRankSpec.modules_to_save": "whole modules trained and saved besides the adapter (embed_tokens, lm_head).",
    "IA3Spec.target_modules": "the modules whose output (or input, for feedforward_modules) gets a learned vector.",
    "IA3Spec.feedforward_modules": "the targets scaled on their input instead of their output.",
    "IA3Spec.exclude_modules": "modules left out of target_modules.",
    "IA3Spec.modules_to_save": "whole modules trained and saved besides the adapter (embed_tokens, lm_head).",
    "PromptTuningSpec.num_virtual_tokens": "how many learned embeddings are prepended to the input.",
    "PromptTuningSpec.init": "`random` (N(0, 1)) or `text` (the embeddings of init_text's tokens).",
    "PromptTuningSpec.init_text": "the text whose token embeddings initialise the prompt when init is text.",
    "PrefixTuningSpec.num_virtual_tokens": "how many learned key/value positions are prepended in every layer.",
    "HoulsbySpec.bottleneck": "the width of the adapter's down-projection.",
    "HoulsbySpec.activation": "the nonlinearity between down- and up-projection.",
    "HoulsbySpec.target_modules": "the modules whose output goes through an adapter.",
    "HoulsbySpec.init_std": "the standard deviation of the down-projection's initialisation.",
    "BitFitSpec.target_modules": "which modules' biases train (`all` = every bias the model has).",
}

# The keys of the `method` section that are not fields of a spec class.
METHOD_KEYS = (
    KeyDoc("method.type", " or ".join(repr(m) for m in METHODS), "lora",
           "the fine-tuning method: full fine-tuning or a PEFT method; the method's own keys follow."),
    KeyDoc("method.init_from", "str or null", "null",
           "a peft adapter directory to continue training from."),
)


def _with_pending(rows: list[KeyDoc], cls: type | None = None) -> list[KeyDoc]:
    """`rows` with an empty doc filled from PENDING_DOCS (by dotted key, or by `Class.field` along `cls`'s MRO)."""
    out = []
    for r in rows:
        field = r.key.rsplit(".", 1)[-1]
        names = [f"{k.__name__}.{field}" for k in cls.__mro__] if cls is not None else [r.key]
        doc = r.doc or next((PENDING_DOCS[n] for n in names if n in PENDING_DOCS), "")
        out.append(KeyDoc(r.key, r.type, r.default, doc))
    return out


def config_reference() -> list[tuple[str, str, list[KeyDoc]]]:
    """The sections of the trainer's config reference: (heading, intro, keys with type, default and doc)."""
    top = _with_pending(describe(TrainConfig, skip=("data", "method")))
    by_section: dict[str, list[KeyDoc]] = {}
    for r in top:
        by_section.setdefault(r.key.split(".")[0] if "." in r.key else "", []).append(r)
    sections = [("top level", "", by_section.pop("")), ("model", "the base model", by_section.pop("model")),
                ("data", "what to train on (jaxft.data.DataConfig)", describe(DataConfig, "data"))]
    sections.append(("method", "the fine-tuning method", list(METHOD_KEYS)))
    for kind, cls in METHOD_SPECS.items():
        rows = _with_pending(describe(cls, "method"), cls)
        first = " ".join((cls.__doc__ or "").split()).split(". ")[0].rstrip(".")
        sections.append((f"method (type: {kind})", f"{first}.", rows))
    for name, intro in (("optim", "the optimizer (AdamW) and the learning-rate schedule"),
                        ("train", "the training loop"), ("eval", "evaluation"),
                        ("export", "what is written at the end")):
        sections.append((name, intro, by_section.pop(name)))
    for name, rows in by_section.items():  # a section added to TrainConfig appears without an entry here
        sections.append((name, "", rows))
    return sections


def all_keys() -> list[str]:
    """Every dotted key of the trainer's config (method keys of every method type)."""
    return sorted({r.key for _, _, rows in config_reference() for r in rows})


REFERENCE_TITLE = "jaxft.train config reference"
REFERENCE_PREAMBLE = ("Every key of `python -m jaxft.train CONFIG.yaml`, with its type, default and meaning. "
                      "Generated from the config classes by `python -m jaxft.train --help-config --markdown > "
                      "docs/config.md` (tests/test_docs.py fails when this file drifts). Set a key in the YAML "
                      "(`optim: {lr: 1e-4}`) or on the command line (`optim.lr=1e-4`); `data.train[].path` is the "
                      "`path` of one entry of the `data.train` list.")


def reference_text(markdown: bool = False) -> str:
    """The config reference, for a terminal or as Markdown (docs/config.md)."""
    return format_reference(config_reference(), markdown, REFERENCE_TITLE, REFERENCE_PREAMBLE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxft.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="the run's YAML config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, values parsed as YAML")
    ap.add_argument("--check", action="store_true",
                    help="validate the config and read the data files (no weights, no compute), and exit")
    ap.add_argument("--help-config", action="store_true",
                    help="list every config key with its type, default and meaning, and exit")
    ap.add_argument("--markdown", action="store_true", help="with --help-config: print Markdown (docs/config.md)")
    args = ap.parse_intermixed_args(argv)  # flags may come after the overrides
    if args.help_config:
        sys.stdout.write(reference_text(args.markdown))
        return 0
    if args.config is None:
        ap.error("the config file is required (or --help-config)")
    if not args.check:
        from jaxft.runtime import keep_freed_host_memory

        keep_freed_host_memory()  # before anything starts JAX's threads

    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:
            stats = check_sources(cfg.data)
            train = [s for s in stats if s.where.startswith("data.train")]
            evals = [s for s in stats if s.where.startswith("data.eval")]
            malformed = sum(s.malformed for s in stats)
            print(f"{args.config}: valid ({cfg.method_type} on {cfg.model.path}, output_dir {cfg.output_dir}); "
                  f"data: {sum(s.kept for s in train)} train and {sum(s.kept for s in evals)} eval records from "
                  f"{len(cfg.data.train) + len(cfg.data.eval)} sources, {malformed} malformed"
                  + (" (see python -m jaxft.data inspect)" if malformed else ""))
            print(f"{args.config}: {check(cfg)}")  # the trainer's own checks: warm-up, eval split, output_dir
            return 0
        summary = run(cfg)
    except (JaxftError, OSError, ValueError) as e:  # every input error is a JaxftError; the others a backstop
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary.get("stopped", "").startswith(("completed", "SIG")) else 1


if __name__ == "__main__":
    sys.exit(main())
