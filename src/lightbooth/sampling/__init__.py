"""Schedules, samplers and guidance: pure tensor functions, no I/O and no config objects."""
