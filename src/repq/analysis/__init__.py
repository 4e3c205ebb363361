"""Diagnostics of re-parameterized models: why a fused kernel is hard to quantize, and plots of it."""
from repq.analysis.weights import LayerWeightStats, center_surround_stats

__all__ = ["LayerWeightStats", "center_surround_stats"]
