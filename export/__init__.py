"""Turns model checkpoints into Triton model-repository versions (see docs/ARCHITECTURE.md, "Export")."""
