"""What both CLIs share: user errors as one line + exit 1, progress bars, timing tables (torch-free)."""
from __future__ import annotations

import sys

import click

from elite_export.errors import EliteError


class EliteGroup(click.Group):
    """A click group whose commands turn EliteError into `error: <message>` and exit code 1.

    Anything else is a bug and keeps its traceback. `default_command` runs when the first
    argument is an option rather than a command name (elite-run's `generate`)."""

    default_command: str | None = None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if self.default_command and args and args[0].startswith("-") and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EliteError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr when stderr is a terminal (logs and pipes stay clean); off with enabled=False."""
    from tqdm import tqdm

    show = enabled and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not show, file=sys.stderr, leave=False, dynamic_ncols=True)


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 1 else f"{c:,.2f}" if abs(c) < 1000 else f"{c:,.0f}"
    return str(c)


def _numeric(s: str) -> bool:
    return s.replace(",", "").replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).isdigit()

