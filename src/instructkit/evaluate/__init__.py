"""Evaluation: metrics and bootstrap confidence intervals (see ``instructkit.evaluate.metrics``)."""
