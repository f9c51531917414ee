"""Training: optimizers and schedules, losses, the train step (loss as a parameter), sharding, checkpoints,
metrics, the one fit loop every training method runs on (`fit`: LM training, distillation, teacher correction,
QAD, QAT), and the `train` job, a thin caller of it."""
