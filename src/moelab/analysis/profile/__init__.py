"""Instruments: where a training step's time goes, phase by phase, for a model, its dense twin and balanced routing."""
