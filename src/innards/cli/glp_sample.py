"""``innards glp sample``: draw activations from a meta-model and write them (denormalised)."""

from __future__ import annotations

from innards.config import command


def main(argv: list[str] | None = None) -> int:
    """Parse GLPSampleConfig and write samples."""
    from innards.glp.sample import GLPSampleConfig, sample_to_file

    def run(cfg: GLPSampleConfig) -> int:
        sample_to_file(cfg)
        return 0

    return command(GLPSampleConfig, run, argv, prog="innards glp sample",
                   description="Sample activations from a GLP (Euler, Heun or AB2 from t = 1 to 0), denormalised.",
                   aliases={"-n": "--n"})
