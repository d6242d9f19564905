"""Calibration and INT8: the targets table (``targets``), the recipes that quantize (``recipes``) and
the attention-gate finder they read (``gates``)."""
