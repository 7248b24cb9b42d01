"""Normalizing-flow generator: the TarFlow objective and sampler (model: `models/tarflow.py`)."""
