"""``innards demo-lm train``: train (and optionally install) the embedded demo language model."""

from __future__ import annotations

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``innards demo-lm train``."""
    # imported when the command runs, so that `innards --help` stays fast
    from innards.recipes.demo_lm import ALIASES, DemoLMConfig, train_demo_lm

    return command(
        DemoLMConfig, train_demo_lm, argv, prog="innards demo-lm train", aliases=ALIASES,
        description="Train the small Llama demo LM on public-domain books (held-out books for validation); "
        "--output.install copies the result into the package.",
    )
