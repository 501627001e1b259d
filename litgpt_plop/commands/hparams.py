"""What ``hyperparameters.yaml`` records of a finetune's options, in the form jsonargparse reads back, so that
``litgpt-plop finetune --config final/hyperparameters.yaml`` repeats the run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from litgpt.data import DataModule
from litgpt.prompts import PromptStyle, prompt_styles


def data_module_hparams(data: DataModule) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a data module, as jsonargparse reads it back: the constructor fields of a
    dataclass data module (LitGPT's are dataclasses), a prompt style by its LitGPT name."""
    init_args = {}
    if dataclasses.is_dataclass(data):
        for f in dataclasses.fields(data):
            value = getattr(data, f.name)
            if not f.init:
                continue
            if isinstance(value, PromptStyle):
                names = [name for name, style in prompt_styles.items() if type(value) is style]
                if not names:
                    continue  # a custom style object: the data module's default will have to do
                value = names[0]
            init_args[f.name] = str(value) if isinstance(value, Path) else value
    return {"class_path": f"{type(data).__module__}.{type(data).__qualname__}", "init_args": init_args}


def plain(values: dict[str, Any]) -> dict[str, Any]:
    """An option group's values with paths as strings, as YAML holds them."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
