"""The project's benchmarks: placement quality, training and calibration cost, QLoRA memory.

Each script is a module of this package, run from the repository root as ``python -m benchmarks.<script>``
(``--help`` says what it measures). What they share lives in ``benchmarks.common`` (paths, worker processes,
peak memory, the machine, result files) and ``benchmarks.stats`` (the statistics). Results and the commands
that produced them are in ``benchmarks/RESULTS.md`` and ``benchmarks/results/``.
"""
