"""Catalog ingestion: Redis Streams events -> enrich -> embed (Triton) -> index (worker.py)."""
