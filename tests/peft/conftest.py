"""jaxft's own "vLLM will not serve" warning is an error in these tests unless a test expects it (`pytest.warns`):
the test output stays free of warnings nobody asked for."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/peft/" in str(item.fspath):
            item.add_marker(pytest.mark.filterwarnings("error:.*vLLM will not serve:UserWarning"))
