"""The commands: ``litgpt-plop plan`` and ``finetune`` (``plan``, ``finetune``, the checks of their input
``inputs``, the parser ``parser``, what a run records ``hparams``), ``--plugin`` inside LitGPT's own ``litgpt``
(``litgpt_hook``, ``litgpt_command``) and the demo (``demo``). Thin: they parse, call the core and print."""
