"""repq: quantization of structurally re-parameterized CNNs (RepVGG family).

    model = repq.create_model("repvgg_a0", num_classes=10, in_chans=1, small_input=True)
    fused = repq.reparameterize(model)
    qmodel = repq.quantize(model, calib_images, repq.PTQConfig(weight="cfws", activation="improved_kl"))
    repq.evaluate(qmodel, test_data)
    qat_model = repq.prepare_qat(model, repq.QATConfig(method="cluster", w_bits=4, a_bits=4), calib_images)

Detection (YOLOv6-style): `create_model("yolov6_n", num_classes=...)`, `load_detection("coco:DIR", "train")`,
`train_detector`, and the same `quantize` / `export_onnx`; `evaluate` returns COCO mAP on detection data.
"""
from repq.analysis import analyze
from repq.checkpoint import load_checkpoint, load_into, save_checkpoint
from repq.data import ImageDataset, ImageTransform, StreamingImageDataset, load_dataset
from repq.data.detection import DetectionDataset, load_detection
from repq.detect.training import DetectTrainConfig, evaluate_detection, train_detector
from repq.errors import RepqError
from repq.evaluation import evaluate
from repq.export import export_onnx
from repq.foreign import load_foreign_weights, read_state_dict
from repq.models import create_model, list_models, register_model
from repq.ptq import PTQConfig, quantize
from repq.qat import QATConfig, convert_qat, prepare_qat
from repq.quant import cfws_split
from repq.reparam import reparameterize
from repq.training import TrainConfig, train

__version__ = "0.1.0"

__all__ = ["DetectTrainConfig", "DetectionDataset", "evaluate_detection", "load_detection", "train_detector",
           "ImageDataset", "ImageTransform", "PTQConfig", "QATConfig", "RepqError", "TrainConfig", "analyze", "cfws_split",
           "convert_qat", "create_model", "evaluate", "export_onnx", "list_models", "load_checkpoint", "load_dataset",
           "load_foreign_weights", "load_into", "prepare_qat", "quantize", "read_state_dict", "register_model",
           "reparameterize", "save_checkpoint", "StreamingImageDataset", "train"]
