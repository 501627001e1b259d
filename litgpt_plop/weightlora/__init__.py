"""WeightLoRA and WeightLoRA+ (docs/methods.md, section 3): keep only the K adapters that matter, while training.

Every candidate adapter i gets a trainable scalar gate ``w_i`` (initialised to 1) on its update,
``h = W x + w_i * s * B_i A_i x``. The gates have their own optimizer (plain SGD, the authors' learning rate 5.0 and
gradient clipping 1.0); after every optimizer step only the K gates of largest magnitude stay, the others are set
to exactly 0 (iterative hard thresholding). With a parameter budget (``WeightLoRAArgs.budget``) instead of K, the
adapters stay in order of gate magnitude, largest first, while their parameters fit it (``cut.budget_mask``:
greedy, as ``--plop.budget``); K counts adapters, which lets the larger MLP matrices overshoot a budget. After
``warmup_steps`` optimizer steps the placement is final: the adapters whose gate is 0 are removed (their
parameters and their optimizer state are freed), the surviving gates are folded into B (``B *= w``) and training
continues as plain LoRA. WeightLoRA+ also halves K ``rounds`` times
during the warm-up and doubles the survivors' rank each time, so the parameter budget stays that of the K
adapters the run starts with (K/4 adapters at rank 4r = K adapters at rank r for two rounds).

How the gates are implemented. A gate multiplies rows of ``lora_B`` through a ``torch.nn.utils.parametrize``
parametrization (``SiteGates``): ``B_used = B * g[:, None]``, where ``g`` holds, for every row of the stored B,
the gate of the adapter that row belongs to. LitGPT's modules are not forked: ``LoRALinear``, the fused
``LoRAQKVLinear`` and ``LoRAQKVMixedRankLinear`` all compute ``s * B A x`` and only ever read ``self.lora_B``,
so they see the gated B. This is exact, not an approximation: the update is linear in B, so scaling the rows of
one adapter's B scales that adapter's update and nothing else. In the fused qkv, each enabled part (query, key,
value) owns its own block of rows of ``lora_B``, so each part is its own adapter with its own gate; the gate
vector is expanded over those rows. The gates are one ``nn.Parameter`` (one entry per candidate) held by the
controller, *not* registered in the model: ``configure_optimizers`` and LitGPT's "lora_ in the name trains"
rule therefore never hand them to the main optimizer, and the model's state dict has no gate in it.

Why the magnitude: the sign of a gate can be absorbed by B, so a gate of -2 matters as much as one of 2. The
authors' early code ranks the signed values (``topk(w)``), which would drop an adapter with a large negative
gate; we rank by ``|w|`` as docs/methods.md says.

When the gates decide (a deviation from "after every step"): only once they have moved. LoRA starts with B = 0, so
every gate's gradient ``<dL/dB_used, B>`` is exactly 0 until B has left 0, and all gates are tied at 1; choosing
then would keep the first K candidates in candidate order (the first layers), and once zeroed a gate practically
never comes back. Our benchmark showed exactly that (the same first-15-layers placement in every seed) before
this rule. "Moved" compares the gate values with those the previous step left (``gates.gates_moved``), not the
gradient: a non-zero gradient can be too small to change a float32 gate near 1. The rule:

- hard-thresholding starts at the first step on which the gates moved;
- a change of the adapters (a WeightLoRA+ round, the end of the warm-up) happens at its scheduled step or later:
  it waits until the gates have moved since the previous change (since the start, for the first), so no cut is
  ever made among gates that have not moved, and two rounds never run on the same step;
- ``litgpt-plop finetune`` refuses, before loading anything, a warm-up for which LitGPT's schedule would make
  the end of the warm-up wait (``args.check_litgpt_warmup``): LitGPT's linear LR warm-up gives step 1 a learning
  rate of 0, so B leaves 0 only at step 2 and the gates first move at step 3 (``LITGPT_FIRST_MOVING_STEP``,
  checked on real runs for several ``--train.lr_warmup_steps``); the shortest warm-up is then 3, and 3 + rounds
  for WeightLoRA+ (``schedule.shortest_warmup``: each round, then the end, on a step of its own from step 3 on).
  It also refuses a warm-up longer than the run. A Lightning run or a plain loop is not refused: there the cut
  waits if it must.

Every cut is recorded with the gates it was decided on (``cut.cut_record``: the kept adapters' gates, the largest
removed one, whether they were all equal), in ``scores.weightlora["cuts"]``, ``gates.json`` and the report.

Schedule (step = number of optimizer steps done, counted from 1):

- every step during warm-up: SGD step of the gates (gradient norm clipped to ``gate_clip``), then keep the top K
  (from the first step on which the gates moved on: step 2 in a plain loop, step 3 under LitGPT's schedule);
- WeightLoRA+ round j = 1..rounds at step ``1 + floor((T - 1) * j / (rounds + 1))`` or later (see above): K
  becomes ``K0 // 2**j``, the top K adapters survive, the rest are removed, the survivors' rank doubles
  (``grow_ranks``, exact);
- step T (``warmup_steps``), or later (see above): removal of the zero-gated adapters, gates folded into B, gates
  gone. With a budget there are no rounds (WeightLoRA+ keeps the budget of the K adapters it starts with).

The main optimizer is edited in place (``remap_optimizer``): removed parameters leave its ``param_groups`` and
its ``state``; tensors that are re-created (a fused qkv that loses a part, a grown adapter) take the place of
the old ones in the same param group; their state is carried over row by row, except for grown adapters, whose
state starts fresh. Folding ``B *= w`` rescales Adam's moments of B's rows (``exp_avg / w``, ``exp_avg_sq / w^2``)
so that the running averages describe the gradients of the folded B (in particular their sign, for negative
gates); an optimizer state this module does not know is reset instead.

``WeightLoRAController`` knows nothing of Lightning: ``litgpt_plop.callbacks.WeightLoRACallback`` drives it from a
``Trainer``; a plain loop calls ``on_optimizer_step`` after each optimizer step, or ``attach(optimizer)`` once.

Where things are: ``args`` (the options, K, the warm-up LitGPT needs), ``schedule`` (which step does what),
``gates`` (the gate parametrization, whether the gates moved), ``cut`` (what a thresholding keeps, K or budget,
and the record of each cut), ``growth`` (exact rank growth), ``surgery`` (editing the main optimizer),
``controller`` (the controller, which ties them together), ``record`` (its scores, state and gate files); the
gates' plot, ``gates.json`` and the report's words are built in ``litgpt_plop.reports.placement``.
"""

from litgpt_plop.weightlora.args import WeightLoRAArgs, check_litgpt_warmup, resolve_k
from litgpt_plop.weightlora.controller import GATES_FILE, GATES_PLOT, WeightLoRAController
from litgpt_plop.weightlora.cut import budget_mask, checked_budget, cut_record, keep_mask
from litgpt_plop.weightlora.gates import (
    SiteGates, attach_gates, detach_gates, fold_gates, gates_moved, step_gates, top_k_mask,
)  # fmt: skip
from litgpt_plop.weightlora.growth import extended_adapter, grow_ranks, reshape_adapters
from litgpt_plop.weightlora.schedule import (
    LITGPT_FIRST_MOVING_STEP, PLAIN_FIRST_MOVING_STEP, ScheduledEvent, WeightLoRASchedule, round_steps, shortest_warmup,
)  # fmt: skip
from litgpt_plop.weightlora.surgery import remap_optimizer, rescale_state_rows

__all__ = [
    "GATES_FILE",
    "GATES_PLOT",
    "LITGPT_FIRST_MOVING_STEP",
    "PLAIN_FIRST_MOVING_STEP",
    "ScheduledEvent",
    "SiteGates",
    "WeightLoRAArgs",
    "WeightLoRAController",
    "WeightLoRASchedule",
    "attach_gates",
    "budget_mask",
    "check_litgpt_warmup",
    "checked_budget",
    "cut_record",
    "detach_gates",
    "extended_adapter",
    "fold_gates",
    "gates_moved",
    "grow_ranks",
    "keep_mask",
    "remap_optimizer",
    "reshape_adapters",
    "rescale_state_rows",
    "resolve_k",
    "round_steps",
    "shortest_warmup",
    "step_gates",
    "top_k_mask",
]
