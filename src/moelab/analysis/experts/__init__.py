"""Instruments: what the experts learned - routing by domain and token class, expert similarity,
stability over training, routing drift under fine-tuning."""
