"""Reading sentence files (labelled sets, prompts): one text per line, tolerant of bad bytes."""

from __future__ import annotations

from pathlib import Path

from innards.errors import InnardsError

# "Unbalanced" label files: one side is empty, or one side has more than MAX_LABEL_RATIO times
# as many sentences as the other. A difference of means from 10:1 data is dominated by the
# larger side's noise-free mean and the smaller side's noisy one; beyond that we refuse.
MAX_LABEL_RATIO = 10.0


def read_lines(path: str | Path, what: str = "text file") -> list[str]:
    """Non-empty stripped lines; undecodable bytes become U+FFFD instead of failing."""
    p = Path(path)
    if not p.is_file():
        raise InnardsError(f"{what} not found: {p}")
    text = p.read_bytes().decode("utf-8", errors="replace")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


PACKAGED_PROMPTS = {"stories": "story_openings.txt", "story_openings": "story_openings.txt"}


def prompts_path(spec: str | Path) -> Path:
    """A prompts file path; the names in PACKAGED_PROMPTS ('stories') mean files shipped with innards."""
    name = PACKAGED_PROMPTS.get(str(spec))
    return Path(__file__).resolve().parent / "prompts" / name if name else Path(spec)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts, one per line ('stories' = the packaged story openings); an empty file is an error."""
    path = prompts_path(path)
    prompts = read_lines(path, "prompts file")
    if not prompts:
        raise InnardsError(f"prompts file {path} holds no prompts")
    return prompts


def check_balanced(n_pos: int, n_neg: int, pos_name: str = "positive", neg_name: str = "negative",
                   max_ratio: float = MAX_LABEL_RATIO) -> None:
    """Refuse an empty side or a size ratio above ``max_ratio`` (see MAX_LABEL_RATIO)."""
    if n_pos == 0 or n_neg == 0:
        empty = pos_name if n_pos == 0 else neg_name
        raise InnardsError(f"label file {empty} holds no sentences")
    ratio = max(n_pos, n_neg) / min(n_pos, n_neg)
    if ratio > max_ratio:
        raise InnardsError(f"label files are unbalanced: {n_pos} positive vs {n_neg} negative sentences "
                           f"(ratio {ratio:.1f} > {max_ratio:g})")


def read_labelled(pos: str | Path, neg: str | Path) -> tuple[list[str], list[str]]:
    """Both sides of a labelled pair of files, checked for emptiness and balance."""
    p, n = read_lines(pos, "positive label file"), read_lines(neg, "negative label file")
    check_balanced(len(p), len(n), str(pos), str(neg))
    return p, n
