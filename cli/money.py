"""``genline caps``: each spend cap with what is spent, reserved and left this period."""

from __future__ import annotations

from typing import Any

import click

from genline.cli.output import emit_json, fail, printable
from genline.config.errors import GenlineError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")
def caps(as_json: bool) -> None:
    """List each spend cap of the catalog with what is spent, reserved and left this period.

    Caps live in the catalog file (GENLINE_CATALOG_FILE) as a list "caps" of
    {"scope": "global"|"user"|"feature", "match": "*" or a value, "period": "day"|"month",
    "limit_usd": number}. A per-user or per-feature cap with match "*" shows one line for each
    user or feature that has used it this period. Periods are UTC days and months.
    """
    from genline.cli.main import _api

    try:
        with _api() as api:
            lines = api.caps()
    except GenlineError as err:
        fail(err, as_json=as_json)
    if as_json:
        emit_json({"caps": lines})
        return
    if not lines:
        click.echo('No spend caps are set (add a "caps" list to the catalog file to set some).')
        return
    click.echo(_table(lines))


def _table(lines: list[dict[str, Any]]) -> str:
    head = ("cap", "for", "since", "limit", "spent", "reserved", "left", "used")
    rows = [
        (
            f"{line['scope']} {line['period']}",
            "everyone" if line["scope"] == "global" else printable(line["subject"]),
            line["period_start"],
            f"${float(line['limit_usd']):,.2f}",
            f"${float(line['spent_usd']):,.4f}",
            f"${float(line['reserved_usd']):,.4f}",
            f"${float(line['headroom_usd']):,.4f}",
            f"{line['used_pct']:.1f}%",
        )
        for line in lines
    ]
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)) for row in (head, *rows)
    )
