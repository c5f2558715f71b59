"""The learner group: N DeepSpeed ranks as Ray actors, their data plan, checkpoints, metrics and weight sync."""
