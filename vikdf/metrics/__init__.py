"""Automatic dialogue metrics (paper §4.4); see :mod:`vikdf.metrics.dialogue_metrics`."""
