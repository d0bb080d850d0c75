"""How good a gate is: the detector registry and post-hoc baselines, OOD metrics, the quick
evaluation, the full benchmark report (with ablations, plots, the model card), the open-set and
robustness benchmarks."""
