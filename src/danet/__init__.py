"""danet: DANet (Dual Attention Network) semantic segmentation, exact to the published models."""

from .engine.predict import Predictor
from .errors import DanetError
from .models import DANet, ModelConfig, create_model, list_models
from .presets import Preset, get_preset

__version__ = "0.1.0"

__all__ = [
    "DANet",
    "DanetError",
    "ModelConfig",
    "Predictor",
    "Preset",
    "create_model",
    "get_preset",
    "list_models",
    "__version__",
]
