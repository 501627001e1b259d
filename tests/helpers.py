"""Plain helpers shared by the test modules (fixtures live in conftest.py): tiny LitGPT configs and models,
checkpoint directories, a Lightning module and trainer, a short ``litgpt-plop finetune`` run, Kendall's tau.

Import as ``from helpers import tiny_config``: pytest puts this directory on ``sys.path`` (rootdir layout, no
``__init__.py``), as it does for conftest.py.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import lightning as L
import litgpt
import torch
import torch.nn.functional as F
from litgpt.args import EvalArgs, TrainArgs
from litgpt.model import GPT
from litgpt.utils import save_config

# What a distributed launch puts in the environment (Lightning's launchers, torchrun): a test's run starts without them.
LAUNCH_VARIABLES = (
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
    "GROUP_RANK", "PL_GLOBAL_SEED", "PL_SEED_WORKERS",
)  # fmt: skip

# ---- tiny models -------------------------------------------------------------------------------------------

SMOLLM2_VOCAB = 49152  # SmolLM2's vocabulary: a model this size takes its tokenizer's ids

ARCHITECTURES = {
    # LLaMA-style (SmolLM2, Llama, Qwen2): gated MLP, RMSNorm, no biases, grouped-query attention
    "llama": dict(mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm", bias=False, parallel_residual=False,
                  rotary_percentage=1.0),
    # Pythia-style, LitGPT's own defaults: biases, parallel residual, LayerNorm, partial rotary, full multi-head
    "neox": dict(mlp_class_name="GptNeoxMLP", norm_class_name="LayerNorm", bias=True, parallel_residual=True,
                 rotary_percentage=0.25),
}  # fmt: skip

# The model of the scoring and calibration tests: 64 wide, a 96-wide MLP, 100 token ids padded to 128, a 128-token
# context (with the 4 heads of 16 and 2 query groups of "llama": query 64 rows, key and value 32 rows each).
SCORING_MODEL = dict(n_embd=64, intermediate_size=96, vocab_size=100, padded_vocab_size=128, block_size=128)



def tiny_config(
    n_layer: int = 2, mlp: str = "llama", *, config_class: type = litgpt.Config, **overrides
) -> litgpt.Config:
    """A tiny random-weight model's config, named ``tiny-{mlp}``; ``overrides`` are any ``config_class`` fields.

    Unless overridden: 32 wide with 4 heads, ``head_size = n_embd // n_head``, 64 token ids (``padded_vocab_size``
    equal to ``vocab_size``), a 32-token context. ``mlp="llama"``: LLaMA-style, 2 query groups, an MLP twice as
    wide as the model; ``mlp="neox"``: Pythia-style, one group per head, an MLP 4 times as wide (LitGPT's default).
    ``config_class=litgpt.lora.Config`` with ``lora_*`` overrides gives a stock LoRA config.
    """
    n_embd, n_head = overrides.get("n_embd", 32), overrides.get("n_head", 4)
    settings = dict(
        name=f"tiny-{mlp}",
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_query_groups=2 if mlp == "llama" else n_head,
        head_size=n_embd // n_head,
        intermediate_size=(2 if mlp == "llama" else 4) * n_embd,
        vocab_size=64,
        block_size=32,
        **ARCHITECTURES[mlp],
    )
    settings.update(overrides)
    settings.setdefault("padded_vocab_size", settings["vocab_size"])
    return config_class(**settings)


def random_gpt(config: litgpt.Config, seed: int = 0) -> GPT:
    """A plain LitGPT model with random weights, drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return GPT(config)


# ---- checkpoint directories --------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def write_checkpoint(directory: Path, config: litgpt.Config, seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    """A LitGPT checkpoint directory (made here, with its parents): ``random_gpt(config, seed)``'s weights and
    ``model_config.yaml``, and the tokenizer files of ``tokenizer_from`` (e.g. SmolLM2's) if given; without it the
    caller writes tokenizer files of its own."""
    directory.mkdir(parents=True)
    torch.save(random_gpt(config, seed).state_dict(), directory / "lit_model.pth")
    save_config(config, directory)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            shutil.copy(tokenizer_from / name, directory / name)
    return directory


def load_gpt(checkpoint_dir: Path) -> GPT:
    """The plain LitGPT model of a checkpoint directory (``model_config.yaml``, ``lit_model.pth``), strictly loaded."""
    model = GPT(litgpt.Config.from_file(checkpoint_dir / "model_config.yaml"))
    model.load_state_dict(torch.load(checkpoint_dir / "lit_model.pth", mmap=True, weights_only=True))
    return model


# ---- Lightning ---------------------------------------------------------------------------------------------


class LitLLM(L.LightningModule):
    """A LightningModule around a plain LitGPT model (``random_gpt(config)``): next-token loss on batches of token
    ids (a tensor, or a dict holding it as ``"input_ids"``), every loss kept in ``losses``; AdamW on the trainable
    parameters, its learning rate falling linearly to 0 over ``lr_decay_steps`` optimizer steps if given."""

    lr_decay_steps: int | None = None  # also for subclasses that set up their own attributes

    def __init__(self, config: litgpt.Config, lr: float, lr_decay_steps: int | None = None) -> None:
        super().__init__()
        self.model = random_gpt(config)
        self.lr = lr
        self.lr_decay_steps = lr_decay_steps
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor | dict, batch_idx: int) -> torch.Tensor:
        input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
        logits = self.model(input_ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        if self.lr_decay_steps is None:
            return optimizer
        decay = self.lr_decay_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def trainer(tmp_path: Path, callbacks: list, max_steps: int = 10, **kwargs) -> L.Trainer:
    """A quiet one-CPU Lightning Trainer writing under ``tmp_path``; ``kwargs`` override any Trainer argument."""
    options = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, callbacks=callbacks, **{**options, **kwargs})


# ---- `litgpt-plop finetune` --------------------------------------------------------------------------------


def tiny_run(checkpoint_dir: Path, out_dir: Path, **kwargs) -> None:
    """A short ``litgpt-plop finetune`` in this process: 3 steps of 4 reasoning-gym items in fp32, then the usual
    end; ``kwargs`` override any of its arguments."""
    from litgpt_plop.data import ReasoningGym
    from litgpt_plop.commands.finetune import setup as finetune

    options = dict(
        checkpoint_dir=checkpoint_dir,
        out_dir=out_dir,
        precision="32-true",
        data=ReasoningGym(train_size=32, val_size=8, prompt_style="alpaca"),
        train=TrainArgs(
            save_interval=2,
            log_interval=1,
            global_batch_size=4,
            micro_batch_size=4,
            lr_warmup_steps=1,
            epochs=1,
            max_steps=3,
            max_seq_length=96,
        ),
        eval=EvalArgs(interval=100, max_iters=2, max_new_tokens=4, initial_validation=False),
        seed=7,
    )
    options.update(kwargs)
    finetune(**options)


def logged_metric(out_dir: Path, name: str) -> list[float]:
    """Every value of ``name`` in a finetune run's CSV log, in order."""
    (metrics,) = out_dir.glob("logs/csv/*/metrics.csv")
    with open(metrics) as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def run_litgpt_plop(monkeypatch, capsys, *args: object) -> tuple[int, str, str]:
    """``litgpt-plop ARGS`` through its real entry point, in this process: exit code (0 if it returned), stdout,
    stderr. Tracebacks stay off, as a user gets them."""
    import sys

    from litgpt_plop.commands.cli import main

    monkeypatch.setattr(sys, "argv", ["litgpt-plop", *map(str, args)])
    monkeypatch.delenv("LITGPT_PLOP_TRACEBACK", raising=False)
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
