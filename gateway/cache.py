"""Small TTL caches for query embeddings and look results: in-process by default, Redis when
configured (shared by gateway processes). A cache failure is a miss, never an error."""

from __future__ import annotations

import logging
import pickle
import time
from collections import OrderedDict

from prometheus_client import Counter

CACHE_LOOKUPS = Counter("looksync_cache_lookups_total", "Cache lookups", ["cache", "result"])
logger = logging.getLogger("looksync.cache")


class MemoryCache:
    def __init__(self, name: str, max_items: int = 10_000, ttl_s: float = 300.0):
        self.name = name
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, object]] = OrderedDict()

    async def get(self, key: str):
        item = self._items.get(key)
        if item is None or item[0] < time.monotonic():
            self._items.pop(key, None)
            CACHE_LOOKUPS.labels(self.name, "miss").inc()
            return None
        self._items.move_to_end(key)
        CACHE_LOOKUPS.labels(self.name, "hit").inc()
        return item[1]

    async def set(self, key: str, value) -> None:
        self._items[key] = (time.monotonic() + self.ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)


class RedisCache:
    """Values are pickled: only this project's own processes write these keys."""

    def __init__(self, name: str, url: str, ttl_s: float = 300.0, timeout_s: float = 0.05):
        import redis.asyncio as redis

        self.name = name
        self.ttl_s = ttl_s
        self.client = redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    async def get(self, key: str):
        try:
            raw = await self.client.get(f"looksync:{self.name}:{key}")
        except Exception as exc:  # Redis down: bypass the cache
            logger.warning("cache %s unavailable: %s", self.name, exc)
            CACHE_LOOKUPS.labels(self.name, "error").inc()
            return None
        CACHE_LOOKUPS.labels(self.name, "miss" if raw is None else "hit").inc()
        return None if raw is None else pickle.loads(raw)

    async def set(self, key: str, value) -> None:
        try:
            await self.client.set(f"looksync:{self.name}:{key}", pickle.dumps(value), ex=int(self.ttl_s))
        except Exception as exc:
            logger.warning("cache %s unavailable: %s", self.name, exc)


class NoCache:
    async def get(self, key: str):
        return None

    async def set(self, key: str, value) -> None:
        return None


def make_cache(kind: str, name: str, redis_url: str, ttl_s: float, max_items: int = 10_000):
    if kind == "redis":
        return RedisCache(name, redis_url, ttl_s)
    if kind == "off":
        return NoCache()
    return MemoryCache(name, max_items, ttl_s)
