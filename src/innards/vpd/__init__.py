"""Parameter decomposition (VPD, and the SPD objective for comparison).

Public API: :class:`~innards.vpd.config.VPDConfig` and :func:`~innards.vpd.config.load_config` (shipped configs by
name), :func:`~innards.vpd.train.train`, :func:`~innards.vpd.evaluate.evaluate`, :func:`~innards.vpd.run.load_run`,
:class:`~innards.vpd.components.Decomposition`, and the analysis functions in :mod:`innards.vpd.analysis`
(``contexts``, ``ablate``, ``graph``). Toy targets with ground truth live in :mod:`innards.vpd.toys`.
"""
