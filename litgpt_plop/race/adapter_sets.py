"""Many placements on one base model: each candidate's adapters are its own modules, swapped in and out.

``apply_placement`` builds a placement's wrappers around the model's base linears, so the wrappers of two
placements share the base weights and differ only in their adapters. An ``AdapterSet`` is one placement's
wrappers (every LoRA module of the model, by name) and config; ``install`` puts them on the model. Only the
adapters and their optimizer states exist per candidate: never a second copy of the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from litgpt.lora import LoRALayer

from litgpt_plop.model.adapt import apply_placement
from litgpt_plop.model.modules import gpt_of
from litgpt_plop.selection.placement import Placement


@dataclass
class AdapterSet:
    """One placement's modules on a model.

    Args:
        placement: the placement.
        modules: every LoRA module of the model (``litgpt.lora.LoRALayer``: rank 0 where the placement has no
            adapter) by its qualified name.
        config: the model's config with the placement's flags.
        rng_state: the CPU (and CUDA) random state this placement's training continues from.
    """

    placement: Placement
    modules: dict[str, nn.Module]
    config: object
    rng_state: dict[str, object]

    def parameters(self) -> list[nn.Parameter]:
        """The adapters' parameters, in the model's order (what an optimizer of this placement holds)."""
        return [p for module in self.modules.values() for name, p in module.named_parameters() if "lora_" in name]


def rng_state() -> dict[str, object]:
    state: dict[str, object] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, object]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA wrappers of the LitGPT model in ``model``, by qualified name."""
    return {name: module for name, module in gpt_of(model).named_modules() if isinstance(module, LoRALayer)}


def install(model: nn.Module, adapters: AdapterSet) -> None:
    """Put ``adapters``' modules and config on the LitGPT model in ``model``, in place; only ``lora_*`` parameters of
    the installed modules require grad, as ``apply_placement`` leaves them."""
    gpt = gpt_of(model)
    old_config = gpt.config
    for name, module in adapters.modules.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(gpt.get_submodule(parent_name), attr, module)
    for module in gpt.modules():  # every module shares the one config object, as ``apply_placement`` leaves it
        if getattr(module, "config", None) is old_config:
            module.config = adapters.config
    for name, param in gpt.named_parameters():
        param.requires_grad = "lora_" in name


def build_adapter_sets(model: nn.Module, placements: list[Placement]) -> list[AdapterSet]:
    """One ``AdapterSet`` per placement, each drawn exactly as a run of that placement alone draws it: from the
    model as loaded (``base``) and the random state it has now, so the winner of a race starts where its own run
    would have started. The model is left carrying the first placement."""
    gpt = gpt_of(model)
    base = AdapterSet(placement=None, modules=lora_modules(gpt), config=gpt.config, rng_state=rng_state())
    sets = []
    for placement in placements:
        install(gpt, base)
        set_rng_state(base.rng_state)
        apply_placement(gpt, placement)
        sets.append(AdapterSet(placement, lora_modules(gpt), gpt.config, rng_state()))
    install(gpt, sets[0])
    set_rng_state(sets[0].rng_state)
    return sets
