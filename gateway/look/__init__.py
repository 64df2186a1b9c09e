"""SearchLook: one look image in, ranked products per garment layer out (pipeline.py)."""
