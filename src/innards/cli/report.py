"""``innards report DIR [DIR ...] --out SITE``: the viewer's pages as a static site (opens from file://)."""

from __future__ import annotations

from innards.config import command
from innards.viewer.report import ReportConfig, report


def main(argv: list[str] | None = None) -> int:
    """Entry point of `innards report`."""
    return command(ReportConfig, report, argv, prog="innards report", positional="dirs",
                   description="Write the pages of every innards run under the folders as a static site (HTML, data "
                               "as .js files, PNGs; relative links): open SITE/index.html from the file system or put "
                               "SITE on any static host.")
