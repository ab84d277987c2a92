"""Few-step distillation (issue: distillation): methods.py (pure maths), module.py (Lightning), run.py (the command)."""
