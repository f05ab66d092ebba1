"""The runners: one command each for the demo (`make demo`), the ablation grid (`make ablate`) and self-training
rounds (`make rounds`), run from a checkout (`python -m runners.NAME`), beside the entry scripts they drive. kit.py
is what they share (settings, running a stage once), stats.py how they report."""
