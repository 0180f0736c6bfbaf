"""mamba-lrp: explain the predictions of state-space sequence models."""
