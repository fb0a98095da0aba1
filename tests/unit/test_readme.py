"""README blocks made from code are what the code renders now (run `make docs` after changing a key)."""

from __future__ import annotations

import dataclasses

from devtools import readme
from distrnn.config import key_fields
from tests.helpers import REPO


def test_the_readme_config_table_is_the_help_text_in_config_py():
    assert readme.config_block() in (REPO / "README.md").read_text(), "the README's config table is stale: make docs"


def test_every_key_is_in_the_table_once_with_its_default():
    table = readme.config_block()
    for name, f in key_fields().items():
        [row] = [line for line in table.splitlines() if line.startswith(f"| `{name}` |")]
        if f.default is not dataclasses.MISSING and f.default is not None and not isinstance(f.default, bool):
            assert f"`{f.default}`" in row, row
