"""docs/config.md is the generated config reference: it must equal what `--help-config --markdown` prints, and every
key must have a doc line."""

from __future__ import annotations

import os


from jaxft.train import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGENERATE = "python -m jaxft.train --help-config --markdown > docs/config.md"


def test_config_md_is_current():
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as f:
        on_disk = f.read()
    assert on_disk == reference.reference_text(markdown=True), f"docs/config.md is out of date; regenerate it: {REGENERATE}"


def test_every_key_has_a_doc_line():
    rows = [r for _, _, rows in reference.config_reference() for r in rows]
    missing = sorted({r.key for r in rows if not r.doc.strip()})
    assert not missing, (f"config keys without a doc line: {', '.join(missing)}; document each in its class "
                         "docstring as `name: text.`")
    assert len(rows) > 60  # every section is there (75 keys today)
    assert {"optim.lr", "data.on_malformed", "method.r", "method.bottleneck", "export.verify"} <= {r.key for r in rows}
