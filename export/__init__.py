"""Turns model checkpoints into Triton model-repository versions (see DESIGN.md, `export/`)."""
