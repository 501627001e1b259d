"""``litgpt-plop``: LitGPT's command line plus automatic LoRA placement.

Every ``litgpt`` subcommand works unchanged (``litgpt-plop chat ...`` is ``litgpt chat ...``). ``plan`` and
``export_peft`` are new, and ``finetune`` / ``finetune_lora`` gain ``--plugin`` and the calibration and scoring
option groups.
"""

import warnings

import torch
from jsonargparse import CLI, set_config_read_mode, set_docstring_parse_options

from litgpt_plop.errors import reported_as_one_line
from litgpt_plop.commands.parser import OneLineErrorParser


def parser_data() -> dict:
    """LitGPT's subcommands, with ours added or put in their place."""
    from litgpt.__main__ import PARSER_DATA

    from litgpt_plop.commands.export_peft import export_peft as export_peft_fn
    from litgpt_plop.commands.finetune import setup as finetune_fn
    from litgpt_plop.commands.plan import plan as plan_fn

    return {
        **PARSER_DATA, "finetune": finetune_fn, "finetune_lora": finetune_fn, "plan": plan_fn, "export_peft": export_peft_fn,
    }


def main() -> None:
    # The same process-wide settings as ``litgpt``'s own entry point, so passthrough commands behave identically.
    set_docstring_parse_options(attribute_docstrings=True)
    set_config_read_mode(urls_enabled=True)
    warnings.filterwarnings(
        action="ignore",
        message=r"The epoch parameter in `scheduler.step\(\)` was not necessary and is being deprecated.*",
        category=UserWarning,
        module=r".*torch\.optim\.lr_scheduler.*",
    )
    torch.set_float32_matmul_precision("high")
    with reported_as_one_line():  # bad input: one line, no traceback
        CLI(parser_data(), parser_class=OneLineErrorParser)

