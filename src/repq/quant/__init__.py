"""Quantizer primitives, activation calibrators, weight quantizers (min-max, MSE, CFWS) and quantized layers."""
from repq.quant.calibrators import ACTIVATION_METHODS, CalibrationConfig, compute_amax
from repq.quant.primitives import dequantize, fake_quantize, int_range, quantize
from repq.quant.weights import WEIGHT_METHODS, QuantizedWeight, cfws_split, quantize_weight

__all__ = ["ACTIVATION_METHODS", "WEIGHT_METHODS", "CalibrationConfig", "QuantizedWeight", "cfws_split",
           "compute_amax", "dequantize", "fake_quantize", "int_range", "quantize", "quantize_weight"]
