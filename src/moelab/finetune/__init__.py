"""MoE fine-tuning: freezing recipes, expert dropout, explicit aux-loss choice."""

from .recipes import RECIPES, apply_recipe, parameter_groups, trainable_report

__all__ = ["RECIPES", "apply_recipe", "parameter_groups", "trainable_report"]
