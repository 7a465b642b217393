"""Serving what was trained: cached batched decoding (`decode`), text generation with stop strings
(`generate`), and inference measured for a model beside its dense twins (`bench`)."""
