"""The ``innards`` command: a thin dispatcher; each subcommand lives in its own module here.

Subcommand modules are imported only when used, so ``innards --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

from innards.errors import guarded

# (words) -> (module under innards.cli, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("demo", "run the main job on the embedded demo model"),
    ("sites",): ("sites", "list every activation site of a model with its width"),
    ("harvest",): ("harvest", "harvest activations into a sharded, resumable store"),
    ("demo-lm", "train"): ("demo_lm", "train the embedded demo language model"),
    ("bench", "harvest"): ("bench_harvest", "benchmark harvesting against the bare forward pass"),
    ("bench", "glp"): ("bench_glp", "benchmark GLP training throughput, MFU and sampler FD"),
    ("bench", "vpd"): ("bench_vpd", "benchmark VPD/SPD training steps per second"),
    ("bench", "steer"): ("bench_steer", "benchmark steered generation with GLP projection vs without"),
    ("bench", "ood"): ("bench_ood", "GLP typicality as an out-of-distribution detector vs baselines"),
    ("glp", "train"): ("glp_train", "train a flow-matching meta-model on an activation store"),
    ("glp", "sample"): ("glp_sample", "sample activations from a meta-model"),
    ("glp", "eval"): ("glp_eval", "evaluate a meta-model (FD, C2ST, delta LM loss)"),
    ("glp", "scale"): ("glp_scale", "train a depth sweep and fit a compute scaling law"),
    ("glp", "neurons"): ("glp_neurons", "top-activating contexts of meta-neurons"),
    ("glp", "score"): ("glp_score", "per-token typicality (denoising loss, ODE likelihood) of a text"),
    ("glp", "distill"): ("glp_distill", "distil a meta-model into a few-step student meta-model"),
    ("sae", "train"): ("sae_train", "train a TopK sparse autoencoder baseline on a store"),
    ("steer", "vector"): ("steer_vector", "build a difference-of-means steering vector"),
    ("steer", "generate"): ("steer_generate", "generate with a steering vector (optionally GLP-projected)"),
    ("steer", "sweep"): ("steer_sweep", "sweep steering strengths: concept score vs fluency"),
    ("steer", "showcase"): ("steer_showcase", "steer packaged concepts: raw first, then methods at equal concept"),
    ("probe",): ("probe", "1-D and dense probing over feature sets (SAE-Probes protocol)"),
    ("vpd", "train"): ("vpd_train", "decompose a model's weights (VPD or SPD objective)"),
    ("vpd", "eval"): ("vpd_eval", "evaluate a decomposition under masks and an adversary"),
    ("vpd", "contexts"): ("vpd_contexts", "top-activating contexts per component"),
    ("vpd", "ablate"): ("vpd_ablate", "effect of removing a component on the next token"),
    ("vpd", "graph"): ("vpd_graph", "attribution graph among components active on a prompt"),
    ("vpd", "curve"): ("vpd_curve", "L0, CE and KL over a decomposition's training"),
    ("view",): ("view", "browse every run under some folders in a local web app"),
    ("report",): ("report", "write the viewer's pages of some folders as a static site"),
    ("export", "neuronpedia"): ("export_neuronpedia", "meta-neurons / VPD subcomponents as Neuronpedia dashboards"),
    ("bench", "view"): ("bench_view", "benchmark the viewer on runs with 20k neurons / 50k subcomponents"),
}


def _usage() -> str:
    lines = ["usage: innards <command> [options]   (innards <command> --help for each)", "", "commands:"]
    for words, (_, text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<18} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``innards`` console command."""
    args = list(sys.argv[1:] if argv is None else argv)
    return guarded(lambda: _dispatch(args))


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from innards import __version__

        print(__version__)
        return 0
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            module = importlib.import_module(f"innards.cli.{COMMANDS[key][0]}")
            return int(module.main(argv[n:]) or 0)
    groups = sorted({w[0] for w in COMMANDS if len(w) > 1})
    if argv[0] in groups:
        subs = [w[1] for w in COMMANDS if w[0] == argv[0]]
        if len(argv) == 1 or argv[1] in ("-h", "--help"):
            print(f"usage: innards {argv[0]} {{{','.join(subs)}}} [options]")
            return 0 if len(argv) > 1 else 2
        print(f"innards: error: unknown command '{argv[0]} {argv[1]}' (choose from: {', '.join(subs)})", file=sys.stderr)
        return 2
    print(f"innards: error: unknown command '{argv[0]}'\n{_usage()}", file=sys.stderr)
    return 2
