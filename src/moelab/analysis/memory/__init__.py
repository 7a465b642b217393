"""Instruments: what training a model takes in memory - planned from the config and measured, per rank
under data, expert and pipeline parallelism, and the busiest rank under a run's routing skew."""
