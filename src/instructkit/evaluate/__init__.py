"""Evaluation: metrics (``instructkit.evaluate.metrics``) and bootstrap confidence intervals
(``instructkit.evaluate.bootstrap``)."""
