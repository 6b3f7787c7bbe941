"""Automatic dialogue metrics (paper §4.4, DESIGN.md §5); see :mod:`vikdf.metrics.dialogue_metrics`."""
