"""Documentation blocks made from code, so that they cannot drift from what they describe.

    python -m devtools.readme        # docs/configuration.md's config table from distrnn/config/schema.py (make docs)

A block sits between a start and an end marker; tests/unit/test_readme.py fails when a block differs
from what its source renders now.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from distrnn.config.schema import key_fields

CONFIGURATION = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"  # the config table's page
CONFIG_START = "<!-- config: generated from distrnn/config/schema.py by `make docs`; do not edit by hand -->"
CONFIG_END = "<!-- /config -->"


def shown_default(f: dataclasses.Field) -> str:
    if f.metadata["shown_default"]:
        return f.metadata["shown_default"]
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)  # a string as written in YAML or --set; a list as [a, b]


def markdown_table() -> str:
    """The config table (docs/configuration.md): every key, its default and its help text, as declared in
    distrnn/config/schema.py."""
    rows = ["| key | default | on resume | meaning |", "| --- | --- | --- | --- |"]
    for name, f in key_fields().items():
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{name}` | `{shown_default(f)}` | {f.metadata['resume']} | {help_text} |")
    return "\n".join(rows)


def replace_block(text: str, start: str, end: str, block: str) -> str:
    """`text` with everything from `start` to `end` (both included) replaced by `block`."""
    before, found, rest = text.partition(start)
    _, found_end, after = rest.partition(end)
    if not (found and found_end):
        raise SystemExit(f"no block {start!r} ... {end!r} in the file")
    return before + block + after


def config_block() -> str:
    return f"{CONFIG_START}\n\n{markdown_table()}\n\n{CONFIG_END}"


def main() -> None:
    CONFIGURATION.write_text(replace_block(CONFIGURATION.read_text(), CONFIG_START, CONFIG_END, config_block()))
    print(f"wrote the config table in {CONFIGURATION}")


if __name__ == "__main__":
    main()
