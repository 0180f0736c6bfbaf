"""State-space sequence models (Mamba, ...) and their numerics. Knows nothing about explanations."""
