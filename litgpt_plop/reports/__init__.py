"""What a placement is told as: ``report.md`` and ``scores.png`` (``placement``), its kappa and mixture-of-experts
sections (``kappa``, ``experts``), WeightLoRA's ``gates.json`` and ``gates.png`` (``gates``)."""
