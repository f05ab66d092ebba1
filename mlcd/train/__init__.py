"""Training: the loop (loop.py), optimizer + schedule (optim.py), checkpoints (checkpoint.py)."""
