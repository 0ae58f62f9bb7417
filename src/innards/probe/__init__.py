"""Probing: SAE-Probes tasks, benchmark-token features (raw, MLP, GLP meta-neurons, SAE, PCA), the rank-based 1-D protocol and dense probes."""
