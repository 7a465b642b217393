"""Conversion: Hugging Face import/export and dense -> MoE upcycling."""
