"""Print the README's table of supported models, generated from relcache's registry of model rows.

``python scripts/supported_models.py`` prints the Markdown table; ``--check README.md`` exits 1 if the README's table
(between the ``supported-models`` markers) differs, and ``--write README.md`` replaces it. tests/models/
test_supported_table.py runs the check, so the README cannot drift from the registry.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relcache.models import supported_models
from relcache.models.base import ModelRow, registered_rows

BEGIN, END = "<!-- supported-models:begin -->", "<!-- supported-models:end -->"


def cached_summary(row: ModelRow) -> str:
    """What a row caches: per block list, its modules (``joint`` where the module takes both streams)."""
    parts = []
    for group in row.groups:
        mods = ", ".join(f"`{s.attr}`" + (" (joint)" if s.joint else "") for s in group.slots())
        parts.append(f"`{group.attr}`: {mods}")
    if row.experts != ("transformer",):
        parts.append("experts " + ", ".join(f"`{e}`" for e in row.experts) + " (see below)")
    return "; ".join(parts)


def table() -> str:
    """The Markdown table, one line per row, in registration order (alphabetical by family)."""
    lines = ["| family | pipeline | transformer class | cached modules (per block) |", "|---|---|---|---|"]
    for row in sorted(registered_rows(), key=lambda r: r.family.lower()):
        classes = ", ".join(f"`{c}`" for c in row.model_classes)
        lines.append(f"| {row.family} | {row.pipeline} | {classes} | {cached_summary(row)} |")
    listed = {c for r in registered_rows() for c in r.model_classes}
    if listed != set(supported_models()):  # an adapter registered without a row would be missing from the table
        raise SystemExit(f"classes served without a row: {sorted(set(supported_models()) - listed)}")
    return "\n".join(lines)


def readme_table(text: str) -> str:
    """The table between the markers of ``text``."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"no {BEGIN} ... {END} markers")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, help="exit 1 if this file's table differs")
    parser.add_argument("--write", type=Path, help="replace this file's table")
    args = parser.parse_args(argv)
    new = table()
    if args.check:
        if readme_table(args.check.read_text()) != new:
            print(f"{args.check}: the supported-models table is stale; run scripts/supported_models.py --write "
                  f"{args.check}", file=sys.stderr)
            return 1
        return 0
    if args.write:
        text = args.write.read_text()
        readme_table(text)  # the markers are there
        head, rest = text.split(BEGIN, 1)
        args.write.write_text(f"{head}{BEGIN}\n{new}\n{END}{rest.split(END, 1)[1]}")
        return 0
    print(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
