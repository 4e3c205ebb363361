"""Export: QuantizeLinear/DequantizeLinear ONNX graphs of repq models, and their verification in ONNX Runtime."""
from repq.export.onnx_qdq import export_onnx
from repq.export.verify import OnnxRuntimeModel, integer_kernels, run_onnx, top1, verify_against_simulation

__all__ = ["OnnxRuntimeModel", "export_onnx", "integer_kernels", "run_onnx", "top1", "verify_against_simulation"]
