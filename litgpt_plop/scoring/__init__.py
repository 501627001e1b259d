"""What is scored and how: the calibration pass over task prompts (``calibration``, ``prompts``) and every scorer
it feeds: PLoP's NFN (``plop``), layer-wise CKA (``cka``, ``hsic``), mixtures of experts' routing (``experts``);
and the condition numbers of the weights, which need no data (``kappa``)."""
