"""Models: re-parameterizable blocks, the RepVGG family and the model registry."""
from repq.models import mobileone as _mobileone  # noqa: F401  (registers mobileone_s0, efficientrep_n)
from repq.models import repvgg as _repvgg  # noqa: F401  (registers the family)
from repq.models import yolo as _yolo  # noqa: F401  (registers yolov6_n, yolov6_pico)
from repq.models.blocks import ConvBN, FusedConvAct, RepVGGBlock
from repq.models.registry import create_model, list_models, register_model
from repq.models.repvgg import RepVGG, RepVGGSpec

__all__ = ["ConvBN", "FusedConvAct", "RepVGG", "RepVGGBlock", "RepVGGSpec", "create_model", "list_models",
           "register_model"]
