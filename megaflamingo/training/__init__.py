"""Training: the DeepSpeed engine (engine.py), the loss (loss.py), the loop, checkpoints, schedules, metrics."""
