"""Exporters: write a Model's stored tensors (and companions) into an artifact directory."""
