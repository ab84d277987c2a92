"""Training: pure losses, Lightning modules, checkpoints; shared by base training, DreamBooth and distillation."""
