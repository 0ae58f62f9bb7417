"""On-manifold steering: difference-of-means vectors, steered generation (optionally GLP-projected),
and its offline evaluation (concept classifier, fluency NLL, distinct-2, bootstrap CIs, sweeps).

Modules: ``vectors`` (build/load/save), ``generate`` (hooks and generation), ``evaluator`` (concept
score), ``fluency``, ``bootstrap``, ``sweep``. Heavy imports happen inside the functions.
"""
