"""Lightning callbacks that place LoRA adapters automatically (importable as ``litgpt_plop.callbacks``)."""

from litgpt_plop.callbacks.plop import PLoPCallback, token_ids_from_batches
from litgpt_plop.callbacks.weightlora import WeightLoRACallback

__all__ = ["PLoPCallback", "WeightLoRACallback", "token_ids_from_batches"]
