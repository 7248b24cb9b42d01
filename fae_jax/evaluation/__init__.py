"""Evaluation metrics and probes. Import the submodules directly (`evaluation.linear_probe`)."""
