"""docs/config.md is the generated config reference: it must equal what `--help-config --markdown` prints, and every
key must have a doc line."""

from __future__ import annotations

import os

import pytest

from jaxft.schema import describe, field_docs
from jaxft.train import __main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGENERATE = "python -m jaxft.train --help-config --markdown > docs/config.md"


def test_config_md_is_current():
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as f:
        on_disk = f.read()
    assert on_disk == cli.reference_text(markdown=True), f"docs/config.md is out of date; regenerate it: {REGENERATE}"


def test_every_key_has_a_doc_line():
    rows = [r for _, _, rows in cli.config_reference() for r in rows]
    missing = sorted({r.key for r in rows if not r.doc.strip()})
    assert not missing, (f"config keys without a doc line: {', '.join(missing)}; document each in its class "
                         "docstring as `name: text.` (or in PENDING_DOCS of jaxft/train/__main__.py)")
    assert len(rows) > 60  # every section is there (75 keys today)
    assert {"optim.lr", "data.on_malformed", "method.r", "method.bottleneck", "export.verify"} <= {r.key for r in rows}


SPEC_CLASSES = {k.__name__: k for cls in cli.METHOD_SPECS.values() for k in cls.__mro__ if k is not object}


def _documented_by_class(name: str) -> bool:
    """Whether the docstring of the class that `name` (`SpecClass.field` or a dotted key) belongs to documents it."""
    cls_name, _, field = name.partition(".")
    if cls_name in SPEC_CLASSES:
        return bool(field_docs(SPEC_CLASSES[cls_name]).get(field))
    return any(r.key == name and r.doc for r in describe(cli.TrainConfig, skip=("method",)))


@pytest.mark.parametrize("name", sorted(cli.PENDING_DOCS))
def test_pending_docs_are_still_pending(name):
    # an entry stays only while its class's docstring lacks the line; once the owner documents it, delete it here
    assert not _documented_by_class(name), f"{name} is documented by its class now; delete it from PENDING_DOCS"
