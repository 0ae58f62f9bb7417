"""What every trainer shares: the optimiser config and LR schedule, checkpoints with exact resume, EMA, precision.

GLP (``glp/train.py``), VPD (``vpd/train.py``), the SAE (``sae/train.py``) and the demo-LM recipe use these
pieces; each keeps its own loop, which owns only what is particular to its model.
"""
