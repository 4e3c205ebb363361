"""Diagnostics of re-parameterized models: why a fused kernel is hard to quantize, with a report and plots."""
from repq.analysis.report import analyze, clipping_sensitivity, quantizer_sqnr, sqnr_db
from repq.analysis.weights import BranchContribution, LayerWeightStats, branch_contributions, center_surround_stats

__all__ = ["BranchContribution", "LayerWeightStats", "analyze", "branch_contributions", "center_surround_stats",
           "clipping_sensitivity", "quantizer_sqnr", "sqnr_db"]
