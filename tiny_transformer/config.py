"""Presets: named model (and training) configurations stored as JSON files in `configs/`.

    >>> from tiny_transformer.config import build_model, load_preset
    >>> model = build_model("tiny")            # a TinyTransformerLM
    >>> load_preset("shakespeare")["model"]    # the hyperparameters, as a dict

A preset file holds {"model_type": "gpt" | "llama", "description": ..., "model": {...},
"training": {...}}. `build_model` also accepts such a dict (a checkpoint's "config" entry), so every
model in the course is built the same way.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from tiny_transformer.model import MODEL_TYPES, CausalLM

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def list_presets() -> list[str]:
    """Names of the bundled presets (the JSON files in `tiny_transformer/configs/`)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_preset(name_or_path: str | Path) -> dict:
    """Load a preset by name ("tiny") or from a JSON file path; returns a fresh dict."""
    path = Path(name_or_path)
    if path.suffix != ".json" or not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise ValueError(f"unknown preset {str(name_or_path)!r}: choose one of {', '.join(list_presets())} "
                         "or give the path of a JSON config file")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    validate_config_dict(cfg, source=str(path))
    return cfg


def validate_config_dict(cfg: dict, source: str = "config") -> None:
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ValueError(f"{source}: a config needs a 'model' section (and 'model_type': gpt or llama)")
    model_type = cfg.get("model_type", "gpt")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: unknown model_type {model_type!r}; choose one of {sorted(MODEL_TYPES)}")


def model_config_from_dict(cfg: dict):
    """The model's config dataclass (TransformerConfig or LlamaConfig) from a preset/checkpoint dict."""
    validate_config_dict(cfg)
    config_cls, _ = MODEL_TYPES[cfg.get("model_type", "gpt")]
    return config_cls.from_dict(cfg["model"])


def build_model(preset: str | Path | dict, **model_overrides) -> CausalLM:
    """Build a model from a preset name, a JSON path or a config dict, overriding model fields.

    >>> build_model("tiny", vocab_size=65, dropout=0.0)
    """
    cfg = copy.deepcopy(preset) if isinstance(preset, dict) else load_preset(preset)
    cfg["model"] = {**cfg["model"], **model_overrides}
    _, model_cls = MODEL_TYPES[cfg.get("model_type", "gpt")]
    return model_cls(model_config_from_dict(cfg))


def preset_parameter_counts() -> dict[str, int]:
    """{preset name: true parameter count}, computed by building each model."""
    return {name: build_model(name).num_parameters() for name in list_presets()}
