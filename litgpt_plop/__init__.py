"""litgpt-plop: decide where LoRA adapters go in a LitGPT model, and put them there."""
