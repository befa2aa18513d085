"""The exit codes of ftsim, ftserver, ftclient and fteval: one table, the same for all four.

Each command's ``--help`` ends with :func:`epilog`; docs/user-guide.md#exit-codes shows the same
table, and tests/unit/test_first_use.py checks both against the commands (and the codes they return).
"""

from __future__ import annotations

import argparse
import textwrap

OK = 0
FAILED = 1
BAD_INPUT = 2
REFUSED = 3
INTERRUPTED = 130

TABLE: tuple[tuple[int, str], ...] = (
    (OK, "done: the run finished, the scores were printed, the data is usable (ftclient check), or the site was "
         "stopped by its operator (ftclient)"),
    (FAILED, "failed while running: a run that did not finish (its checkpoints are kept: --resume), a child "
             "process that exited, anything unexpected"),
    (BAD_INPUT, "bad input, refused before anything ran: a flag, a config key, a file that is not there, or data "
                "no tool will train on or score (ftclient check: NOT usable)"),
    (REFUSED, "refused by the other side: ftclient's key is not registered with the coordinator"),
    (INTERRUPTED, "interrupted (Ctrl-C or SIGTERM) before the end: the checkpoints so far are kept"),
)  # fmt: skip


HEAD = "exit codes (the same for ftsim, ftserver, ftclient and fteval):"


def table_lines(width: int = 100, indent: str = "") -> list[str]:
    """The table, one wrapped row per code."""
    return [HEAD] + [
        textwrap.fill(meaning, width, initial_indent=f"{indent}  {code:<4} ", subsequent_indent=f"{indent}       ")
        for code, meaning in TABLE
    ]


def epilog() -> str:
    """The table as a ``--help`` epilog; give the parser ``formatter_class=HelpFormatter``."""
    return "\n".join(table_lines())


class HelpFormatter(argparse.HelpFormatter):
    """argparse's own, but the exit-code table keeps its rows (wrapped to the terminal)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(HEAD):
            return "\n".join(table_lines(width, indent))
        return super()._fill_text(text, width, indent)
