"""Training: optimizers and schedules, losses, the train step (loss as a parameter), sharding, checkpoints,
metrics, and the `train` job that ties them together."""
