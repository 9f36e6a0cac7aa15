"""DANet models: backbone, attention, heads, and the preset registry."""

from .attention import ChannelAttention, PositionAttention
from .danet import DANet, ModelConfig
from .heads import DAHead, FCNHead
from .registry import create_model, list_models
from .resnet import ResNet

__all__ = [
    "ChannelAttention",
    "DAHead",
    "DANet",
    "FCNHead",
    "ModelConfig",
    "PositionAttention",
    "ResNet",
    "create_model",
    "list_models",
]
