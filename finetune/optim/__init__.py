"""Optimizer pieces the libraries lack or get wrong: a layer-wise per-parameter engine and GaLore projection."""
