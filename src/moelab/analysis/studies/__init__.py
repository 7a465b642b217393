"""Studies: they train runs (dense against MoE, seeds, learning-rate sweeps and fits, fine-tuning recipes,
scaling grids) and read them with the instruments; an instrument never imports a study."""
