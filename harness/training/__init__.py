"""Training loops for the zoo models on the built-in synthetic datasets (GPU, or slowly on CPU)."""
