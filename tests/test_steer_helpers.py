"""Helpers shared by the steering and meta-neuron tests (no tests here)."""

from __future__ import annotations

from pathlib import Path

import torch

SITE = "blocks.1.resid_post"

POS = ["what a wonderful happy day", "i love this lovely film", "a delightful and joyful story",
       "great fun, a real pleasure", "she smiled with joy and delight", "the best and brightest moment",
       "so good, warm and kind", "beautiful, charming and sweet", "a happy ending full of love",
       "brilliant and wonderful acting", "cheerful friends had a great time", "pleasant, bright and lovely"]
NEG = ["what a terrible awful day", "i hate this boring film", "a dreadful and miserable story",
       "bad, a real waste of time", "she cried with grief and pain", "the worst and darkest moment",
       "so bad, cold and cruel", "ugly, dull and bitter", "a sad ending full of hate",
       "horrible and painful acting", "angry enemies had a bad time", "gloomy, dark and nasty"]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def make_glp(model, site: str = SITE, n_blocks: int = 2, seed: int = 0, out: Path | None = None):
    """A random tiny GLP whose statistics come from the model's own activations on a few sentences."""
    from innards.glp.model import GLP, GLPConfig
    from innards.models.hooks import run_with_cache
    from innards.models.sites import resolve_site

    s = resolve_site(model, site)
    torch.manual_seed(seed)
    enc = model.tokenizer(POS + NEG, return_tensors="pt", padding=True)
    acts = run_with_cache(model, enc["input_ids"], [s.name], attention_mask=enc["attention_mask"])[s.name]
    rows = acts[enc["attention_mask"].bool()].double()
    stats = {"mean": rows.mean(0), "var": rows.var(0), "count": rows.shape[0],
             "mean_norm": float(rows.norm(dim=-1).mean())}
    glp = GLP(GLPConfig(d_in=s.width, n_blocks=n_blocks), meta={"model": model.innards_source, "site": s.name,
                                                                "stats_by_site": {s.name: stats}})
    glp.eval()
    if out is not None:
        glp.save_pretrained(out)
    return glp
