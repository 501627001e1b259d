"""WeightLoRA and WeightLoRA+ (docs/methods.md, section 3): keep only the K adapters that matter, while training.

Every candidate adapter i gets a trainable scalar gate ``w_i`` (initialised to 1) on its update,
``h = W x + w_i * s * B_i A_i x``. The gates have their own optimizer (plain SGD, the authors' learning rate 5.0 and
gradient clipping 1.0); after every optimizer step only the K gates of largest magnitude stay, the others are set
to exactly 0 (iterative hard thresholding). After ``warmup_steps`` optimizer steps the placement is final: the
adapters whose gate is 0 are removed (their parameters and their optimizer state are freed), the surviving gates
are folded into B (``B *= w``) and training continues as plain LoRA. WeightLoRA+ also halves K ``rounds`` times
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

When the thresholding starts (a deviation from "after every step"): not before the gates have had a non-zero
gradient. LoRA starts with B = 0, so at the first step every gate's gradient ``<dL/dB_used, B>`` is exactly 0 and
all gates are still tied at 1; thresholding then would keep the first K candidates in candidate order (the first
layers), and once zeroed a gate practically never comes back: its B got one step of training, so its gradient is
small next to the kept gates' values. Our benchmark showed exactly that (the same first-15-layers placement in
every seed) before this rule. So the gates first learn with every adapter on: the first hard-thresholding waits
for a non-zero gate gradient, and the WeightLoRA+ rounds are spread over the steps after the first.

Schedule (step = number of optimizer steps done, counted from 1):

- every step during warm-up: SGD step of the gates (gradient norm clipped to ``gate_clip``), then keep the top K
  (from the first step whose gate gradient is not all zero on: step 2, or step 3 under LitGPT's schedule,
  whose linear warm-up gives the first step a learning rate of 0, so B is still 0 at the second);
- WeightLoRA+ round j = 1..rounds at step ``1 + floor((T - 1) * j / (rounds + 1))``: K becomes ``K0 // 2**j``, the top K
  adapters survive, the rest are removed, the survivors' rank doubles (``grow_ranks``, exact);
- step T (``warmup_steps``): removal of the zero-gated adapters, gates folded into B, gates gone.

The main optimizer is edited in place (``remap_optimizer``): removed parameters leave its ``param_groups`` and
its ``state``; tensors that are re-created (a fused qkv that loses a part, a grown adapter) take the place of
the old ones in the same param group; their state is carried over row by row, except for grown adapters, whose
state starts fresh. Folding ``B *= w`` rescales Adam's moments of B's rows (``exp_avg / w``, ``exp_avg_sq / w^2``)
so that the running averages describe the gradients of the folded B (in particular their sign, for negative
gates); an optimizer state this module does not know is reset instead.

``WeightLoRAController`` knows nothing of Lightning: ``litgpt_plop.callbacks.WeightLoRACallback`` drives it from a
``Trainer``; a plain loop calls ``on_optimizer_step`` after each optimizer step, or ``attach(optimizer)`` once.

Where things are: ``args`` (the options, K), ``schedule`` (which step does what), ``gates`` (the gate
parametrization), ``growth`` (exact rank growth), ``surgery`` (editing the main optimizer), ``controller`` (the
controller, which ties them together); the gates' plot and ``gates.json`` are built in ``litgpt_plop.report``.
"""

from litgpt_plop.weightlora.args import WeightLoRAArgs, resolve_k
from litgpt_plop.weightlora.controller import GATES_FILE, GATES_PLOT, WeightLoRAController
from litgpt_plop.weightlora.gates import SiteGates, attach_gates, detach_gates, fold_gates, step_gates, top_k_mask
from litgpt_plop.weightlora.growth import extended_adapter, grow_ranks, reshape_adapters
from litgpt_plop.weightlora.schedule import ScheduledEvent, WeightLoRASchedule, round_steps
from litgpt_plop.weightlora.surgery import remap_optimizer, rescale_state_rows

__all__ = [
    "GATES_FILE",
    "GATES_PLOT",
    "ScheduledEvent",
    "SiteGates",
    "WeightLoRAArgs",
    "WeightLoRAController",
    "WeightLoRASchedule",
    "attach_gates",
    "detach_gates",
    "extended_adapter",
    "fold_gates",
    "grow_ranks",
    "remap_optimizer",
    "reshape_adapters",
    "rescale_state_rows",
    "resolve_k",
    "round_steps",
    "step_gates",
    "top_k_mask",
]
