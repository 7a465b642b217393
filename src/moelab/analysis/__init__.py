"""Measurements that answer "why is MoE harder": memory planning and dense-vs-MoE reports."""
