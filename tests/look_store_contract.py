"""What both look-match stores must do (gateway/index/look_matches.py); run against the embedded
index (tests/test_offline.py), the Elasticsearch double and a live cluster
(tests/test_index_elasticsearch.py)."""

from collections import Counter

from gateway.index.base import EmbeddingSpace
from gateway.offline.record import LookMatches, LookRequest


def record(look_id: str, computed_at: float, version: int = 1, top: str = "p1") -> LookMatches:
    layers = [
        {
            "query": {
                "layer": "topwear",
                "categories": ["tshirt"],
                "query": "red t-shirt",
                "source": "fallback",
            },
            "rerank_source": "embedding",
            "candidates": [{"id": top, "score": 0.9, "duplicates": 0, "item_id": ""}],
        }
    ]
    request = LookRequest(look_id, f"/looks/{look_id}.png", {"market": "US"}, 30)
    return LookMatches(
        look_id, EmbeddingSpace("clip", version, 64), computed_at, 1_000 + version, request, layers
    )


async def check_store(store) -> None:
    """One record per look; a later computation replaces an earlier one, never the reverse;
    scans read every look (without its candidate lists); unknown ids are absent."""
    await store.put([record("a", 10.0), record("b", 10.0), record("a", 11.0, top="p2")])
    await store.put([record("b", 12.0, top="p3")])
    await store.put([record("b", 11.0, top="old")])  # computed earlier, arrives later: refused
    await store.optimize()
    got = await store.get(["a", "b", "nobody"], strong=True)
    assert set(got) == {"a", "b"}
    assert got["a"].layers[0]["candidates"][0]["id"] == "p2"
    assert got["b"].layers[0]["candidates"][0]["id"] == "p3"
    assert got["b"].computed_at == 12.0 and got["b"].catalog_position == 1_001
    assert got["a"].request == record("a", 0).request and got["a"].space == EmbeddingSpace("clip", 1, 64)
    assert await store.count() == 2
    scanned = [r for batch in [b async for b in store.scan(batch_size=1)] for r in batch]
    assert Counter(r.look_id for r in scanned) == {"a": 1, "b": 1}
    assert all(r.layers == [] and r.request.filters == {"market": "US"} for r in scanned)
