"""Storage: everything that reads or writes a run folder, below data, parallelism and
training. `checkpoint` (the checkpoint formats: single-file safetensors and DCP folders,
manifests with checksums, "latest good"), `run` (a run folder loaded: config, tokenizer,
weights), `outputs` (guarded, staged outputs and the OS's errors as one line)."""
