"""Sparse autoencoders: the SAELens-layout model (``model``), loading by folder, hub id or SAELens
registry name (``load``), and innards' TopK trainer (``train``)."""
