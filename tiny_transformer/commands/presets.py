"""`python -m tiny_transformer presets`: the bundled presets with their true parameter counts."""

from __future__ import annotations

import json

from tiny_transformer.config import build_model, list_presets, load_preset


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="?", help="show one preset's full JSON instead of the table")


def run(args) -> int:
    if args.name:
        print(json.dumps(load_preset(args.name), indent=2))
        return 0
    print(f"{'preset':<26} {'family':<6} {'parameters':>12}  description")
    for name in list_presets():
        cfg = load_preset(name)
        n = build_model(cfg).num_parameters()
        print(f"{name:<26} {cfg.get('model_type', 'gpt'):<6} {n:>12,}  {cfg.get('description', '')}")
    return 0
