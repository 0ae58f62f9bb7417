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


PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
PACKAGED_PROMPTS = {"stories": "story_openings.txt", "story_openings": "story_openings.txt"}
# concepts shipped with innards (topics and moods of children's books), each with two disjoint sentence
# sets: one builds the steering vector, the other trains and tests the concept evaluator
TOPICS = ("sea", "royalty", "food", "night", "winter")
CONCEPTS = (*TOPICS, "happy")
N_OTHER = 5  # sentences of each other topic among a topic evaluator's negatives
N_NEUTRAL = 40


def prompts_path(spec: str | Path) -> Path:
    """A prompts file path; the names in PACKAGED_PROMPTS ('stories') mean files shipped with innards."""
    name = PACKAGED_PROMPTS.get(str(spec))
    return PROMPTS_DIR / name if name else Path(spec)


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


def concept_sentences(concept: str) -> dict[str, list[str]]:
    """A packaged concept's sentences: vector_pos/vector_neg (the vector) and eval_pos/eval_neg (the evaluator).

    Topics contrast with neutral sentences (and, for the evaluator, a few sentences of every other topic, so it
    detects this topic rather than any topic); happy contrasts with sad.
    """
    if concept not in CONCEPTS:
        raise InnardsError(f"no packaged concept '{concept}' (packaged: {', '.join(CONCEPTS)})")
    p = PROMPTS_DIR
    if concept == "happy":
        return {"vector_pos": read_lines(p / "happy.txt"), "vector_neg": read_lines(p / "sad.txt"),
                "eval_pos": read_lines(p / "happy.eval.txt"), "eval_neg": read_lines(p / "sad.eval.txt")}
    neg = read_lines(p / "neutral.eval.txt")[:N_NEUTRAL]
    for other in TOPICS:
        if other != concept:
            neg += read_lines(p / f"{other}.eval.txt")[:N_OTHER]
    return {"vector_pos": read_lines(p / f"{concept}.vector.txt"), "vector_neg": read_lines(p / "neutral.vector.txt"),
            "eval_pos": read_lines(p / f"{concept}.eval.txt"), "eval_neg": neg}
