"""Lightning callbacks that place LoRA adapters automatically (importable as ``litgpt_plop.callbacks``)."""
