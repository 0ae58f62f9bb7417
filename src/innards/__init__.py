"""innards: look inside language models.

Two halves: generative meta-models of activations (GLP: harvest, train, sample, project, probe)
and parameter decomposition (VPD: rank-one components with learned causal importance).
Heavy modules are imported lazily, so ``import innards`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> module that defines it
_LAZY = {
    "InnardsError": "innards.errors",
    "load_model": "innards.models.load",
    "load_tokenizer": "innards.models.load",
    "list_sites": "innards.models.sites",
    "DemoLMConfig": "innards.recipes.demo_lm",
    "train_demo_lm": "innards.recipes.demo_lm",
    "resolve_site": "innards.models.sites",
    "capture": "innards.models.hooks",
    "edit": "innards.models.hooks",
    "run_with_cache": "innards.models.hooks",
    "add_vector": "innards.models.hooks",
    "replace_with": "innards.models.hooks",
    "n_layers": "innards.models.sites",
    "expand_sites": "innards.models.sites",
    "site_metadata": "innards.models.sites",
    "INDEX_CONVENTION": "innards.models.sites",
    "ActivationStore": "innards.data.store",
    "harvest": "innards.data.harvest",
    "HarvestConfig": "innards.data.harvest",
    "iter_documents": "innards.data.text",
    "open_text": "innards.data.text",
    "steer_generate": "innards.steer.generate",
    "generate_steered": "innards.steer.generate",
    "Steering": "innards.steer.generate",
    "apply_steering": "innards.steer.generate",
    "load_vector": "innards.steer.vectors",
    "diff_means": "innards.steer.vectors",
    "run_sweep": "innards.steer.sweep",
    "load_or_train_evaluator": "innards.steer.evaluator",
    "glp_neurons": "innards.glp.neurons",
    "ProbeConfig": "innards.probe.run",
    "run_probe": "innards.probe.run",
    "VPDConfig": "innards.vpd.config",
    "Decomposition": "innards.vpd.components",
    "load_run": "innards.vpd.run",
    "top_contexts": "innards.vpd.analysis",
    "text_windows": "innards.vpd.analysis",
    "GLP": "innards.glp.model",
    "GLPConfig": "innards.glp.model",
    "GLPTrainConfig": "innards.glp.train",
    "GLPOptimConfig": "innards.glp.train",
    "GaussianFlow": "innards.glp.gaussian",
    "ProjectionConfig": "innards.glp.projection",
    "ScoreConfig": "innards.glp.score",
    "score_text": "innards.glp.score",
    "log_likelihood": "innards.glp.score",
    "DistillConfig": "innards.glp.distill",
    "distill_glp": "innards.glp.distill",
    "ModelConfig": "innards.models.config",
    "Run": "innards.run",
    "read_run": "innards.run",
    "SteeringVector": "innards.steer.vectors",
    "VectorConfig": "innards.steer.vectors",
    "build_vector": "innards.steer.vectors",
    "SweepConfig": "innards.steer.sweep",
    "build_report": "innards.viewer.report",
    "train_glp": "innards.glp.train",
    "evaluate_glp": "innards.glp.evaluate",
    "TopKSAE": "innards.sae.model",
    "train_sae": "innards.sae.train",
    "SAETrainConfig": "innards.sae.train",
    "EvalConfig": "innards.glp.evaluate",
    "scale": "innards.glp.scale",
    "ScaleConfig": "innards.glp.scale",
    "frechet_distance": "innards.glp.fd",
    "c2st_auc": "innards.glp.c2st",
    "load_sae": "innards.sae.load",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'innards' has no attribute {name!r}")
