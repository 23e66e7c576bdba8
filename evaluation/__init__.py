"""Evaluation: ``tasks/`` (the Task interface and the built-in digits task), ``measure/`` (throughput,
memory, FLOPs, environment), ``training/`` (one training loop, finetuning) and ``studies/``
(compare, bench, sweep, plot)."""
