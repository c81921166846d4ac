"""The trainer's config reference: every key with its type, default and one doc line, read from the config
dataclasses (their `name: text.` docstring entries) and the PEFT registry's spec classes. `python -m jaxft.train
--help-config` prints it; docs/config.md is its Markdown (tests/test_docs.py keeps the file current)."""

from __future__ import annotations

from jaxft import peft
from jaxft.data.config import DataConfig
from jaxft.schema import KeyDoc, describe, format_reference
from jaxft.train.config import METHODS, TrainConfig

# The keys of the `method` section that are not fields of a spec class.
METHOD_KEYS = (
    KeyDoc("method.type", " or ".join(repr(m) for m in METHODS), "lora",
           "the fine-tuning method: full fine-tuning or a PEFT method; the method's own keys follow."),
    KeyDoc("method.init_from", "str or null", "null",
           "a peft adapter directory to continue training from."),
    KeyDoc("method.adapter", "'lora' or 'dora'", "lora",
           "with type: qlora, the adapter trained over the NF4 base (rsLoRA: lora with use_rslora)."),
)


def config_reference() -> list[tuple[str, str, list[KeyDoc]]]:
    """The sections of the trainer's config reference: (heading, intro, keys with type, default and doc)."""
    top = describe(TrainConfig, skip=("data", "method"))
    by_section: dict[str, list[KeyDoc]] = {}
    for r in top:
        by_section.setdefault(r.key.split(".")[0] if "." in r.key else "", []).append(r)
    sections = [("top level", "", by_section.pop("")), ("model", "the base model", by_section.pop("model")),
                ("data", "what to train on (jaxft.data.DataConfig)", describe(DataConfig, "data"))]
    sections.append(("method", "the fine-tuning method", list(METHOD_KEYS)))
    for kind in peft.method_names():
        cls = peft.spec_class(kind)
        rows = describe(cls, "method")
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
