"""The spellings of checkpoint keys (spec §1.4): the hub's (`vision_tower.vision_model.*`, `language_model.model.*`),
transformers-5-saved (`vision_tower.*`) and transformers-5 in-memory (`model.*`), against this module tree's names.
Used by the loader (`loading.py`) and by the LoRA adapters' PEFT key names (`lora.py`).
"""

from __future__ import annotations

import re


def canonical_key(key: str) -> str:
    """Any accepted spelling -> this module tree's name (`vision_tower.*`, `language_model.*`, ...)."""
    if key.startswith("model."):  # transformers-5 in-memory
        key = key[len("model."):]
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head.weight"
    key = re.sub(r"^vision_tower\.vision_model\.", "vision_tower.", key)
    return re.sub(r"^language_model\.model\.", "language_model.", key)


def hub_key(name: str) -> str:
    """This module tree's name -> the hub spelling Google's checkpoints use."""
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    if name.startswith("language_model."):
        return "language_model.model." + name[len("language_model."):]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    return name
