"""ConvForever model: ConvNeXt V1/V2 with timm-compatible state dicts, presets and optimizer groups."""

from .config import MODEL_NAMES, PRESETS, ModelConfig, Preset, resolve_model_name, stage_depths_for
from .convnext import ConvNeXt, create_model
from .parameters import flat_parameter_names, param_groups

__all__ = [
    "MODEL_NAMES",
    "PRESETS",
    "ConvNeXt",
    "ModelConfig",
    "Preset",
    "create_model",
    "flat_parameter_names",
    "param_groups",
    "resolve_model_name",
    "stage_depths_for",
]
