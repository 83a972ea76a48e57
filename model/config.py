"""Model presets, ConvForever's depth mapping and the model config that checkpoints store.

The presets copy the ``model_args`` of timm's registered ``convnext_*`` / ``convnextv2_*`` functions
(``timm/models/convnext.py``), including the arguments that change parameter shapes (``conv_mlp``) or
keys (V2: ``use_grn=True, ls_init_value=None``), so a preset here has exactly timm's state dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Preset:
    """Architecture of one timm ConvNeXt variant.

    ``conv_mlp``: timm builds atto…nano with 1×1-conv MLPs and LayerNorm2d in the blocks, which makes
    ``mlp.fc1``/``mlp.fc2`` weights 4-D; the larger ones use Linear on channels-last tensors.
    ``version``: 2 adds GRN to the MLP (``mlp.grn.*``) and drops layer scale (no ``gamma``).
    """

    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    conv_mlp: bool = False
    version: int = 1


PRESETS: dict[str, Preset] = {
    "convnext_atto": Preset((2, 2, 6, 2), (40, 80, 160, 320), conv_mlp=True),
    "convnext_femto": Preset((2, 2, 6, 2), (48, 96, 192, 384), conv_mlp=True),
    "convnext_pico": Preset((2, 2, 6, 2), (64, 128, 256, 512), conv_mlp=True),
    "convnext_nano": Preset((2, 2, 8, 2), (80, 160, 320, 640), conv_mlp=True),
    "convnext_tiny": Preset((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": Preset((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": Preset((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnextv2_atto": Preset((2, 2, 6, 2), (40, 80, 160, 320), conv_mlp=True, version=2),
    "convnextv2_femto": Preset((2, 2, 6, 2), (48, 96, 192, 384), conv_mlp=True, version=2),
    "convnextv2_pico": Preset((2, 2, 6, 2), (64, 128, 256, 512), conv_mlp=True, version=2),
    "convnextv2_nano": Preset((2, 2, 8, 2), (80, 160, 320, 640), conv_mlp=True, version=2),
    "convnextv2_tiny": Preset((3, 3, 9, 3), (96, 192, 384, 768), version=2),
    "convnextv2_small": Preset((3, 3, 27, 3), (96, 192, 384, 768), version=2),
    "convnextv2_base": Preset((3, 3, 27, 3), (128, 256, 512, 1024), version=2),
}

MODEL_NAMES: tuple[str, ...] = tuple(PRESETS)

# Short names mean V1, the variant ConvForever trains by default.
ALIASES: dict[str, str] = {name.removeprefix("convnext_"): name for name in MODEL_NAMES if name.startswith("convnext_")}

# Keys of ModelConfig.to_dict() that are computed from the fields; from_dict() checks rather than sets them.
DERIVED_KEYS: tuple[str, ...] = ("depths", "dims", "version", "conv_mlp")


def resolve_model_name(name: str) -> str:
    """Return the timm name for a timm name or a short alias (``"tiny"`` → ``"convnext_tiny"``)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(
            f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)} "
            f"(short aliases for V1: {', '.join(ALIASES)})"
        )
    return key


def stage_depths_for(depth: int, num_stages: int = 4) -> tuple[int, ...]:
    """Spread ``depth`` blocks over the stages: ``depth // num_stages`` each, the remainder to the earliest.

    This is ConvForever's own mapping (16 → (4, 4, 4, 4), 30 → (8, 8, 7, 7), 5 → (2, 1, 1, 1)); it keeps
    every stage non-empty so all four resolutions and downsamples exist.
    """
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ValueError(f"depth must be an int, got {depth!r}")
    if depth < num_stages:
        raise ValueError(
            f"depth={depth} is too small: ConvNeXt has {num_stages} stages and each needs at least one block, "
            f"so depth must be >= {num_stages} (or leave depth unset to keep the preset's depths)"
        )
    base, remainder = divmod(depth, num_stages)
    return tuple(base + 1 if stage < remainder else base for stage in range(num_stages))


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model of the same shape; saved in every checkpoint via ``to_dict``.

    ``name`` accepts a timm name or a short V1 alias and is normalised to the timm name, so equal
    architectures always serialise the same way.
    """

    name: str = "convnext_atto"
    # ConvForever depth override: total blocks, spread over stages by stage_depths_for; None keeps the preset.
    depth: int | None = None
    num_classes: int = 50
    drop_path_rate: float = 0.0
    # Small layer-scale init keeps deep stacks near identity at the start; V2 has no layer scale and ignores it.
    layer_scale_init_value: float = 1e-6
    in_chans: int = 3

    def __post_init__(self) -> None:
        self.name = resolve_model_name(self.name)
        if self.depth is not None:
            stage_depths_for(self.depth)  # raises with a clear message
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not self.layer_scale_init_value > 0.0:
            raise ValueError(f"layer_scale_init_value must be > 0, got {self.layer_scale_init_value}")
        if self.in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")

    @property
    def preset(self) -> Preset:
        return PRESETS[resolve_model_name(self.name)]

    @property
    def depths(self) -> tuple[int, ...]:
        return self.preset.depths if self.depth is None else stage_depths_for(self.depth, len(self.preset.dims))

    @property
    def dims(self) -> tuple[int, ...]:
        return self.preset.dims

    @property
    def version(self) -> int:
        return self.preset.version

    @property
    def conv_mlp(self) -> bool:
        return self.preset.conv_mlp

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields plus the derived architecture, so a checkpoint says what it holds."""
        return {
            **asdict(self),
            "depths": list(self.depths),
            "dims": list(self.dims),
            "version": self.version,
            "conv_mlp": self.conv_mlp,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Rebuild from ``to_dict`` output; derived keys are not set but checked.

        A mismatch means the presets changed since the checkpoint was written, and loading its weights
        would fail later with a less helpful shape error.
        """
        field_names = {f.name for f in fields(cls)}
        unknown = set(d) - field_names - set(DERIVED_KEYS)
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; expected {sorted(field_names)}")
        config = cls(**{k: v for k, v in d.items() if k in field_names})
        rebuilt = config.to_dict()
        for key in DERIVED_KEYS:
            if key not in d:
                continue
            stored = list(d[key]) if isinstance(d[key], (list, tuple)) else d[key]
            if stored != rebuilt[key]:
                raise ValueError(
                    f"model config says {key}={d[key]!r} but {config.name} with depth={config.depth} "
                    f"builds {key}={rebuilt[key]!r}"
                )
        return config
