"""Small TTL caches for query embeddings and look results: in-process by default, Redis when
configured (shared by gateway processes). A cache failure is a miss, never an error.

Values are JSON under a format version (never pickle: whoever can write to Redis must not be
able to run code in the gateway, and an entry written by another release is a miss, not an
error). What goes in is plain data: numbers, strings, lists, dicts."""

from __future__ import annotations

import json
import logging
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


FORMAT = 1  # bump when the shape of cached values changes: older entries become misses


class RedisCache:
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
        if raw is None:
            CACHE_LOOKUPS.labels(self.name, "miss").inc()
            return None
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict) or entry.get("format") != FORMAT:
                raise ValueError(f"format {entry.get('format') if isinstance(entry, dict) else '?'}")
            value = entry["value"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            logger.warning("cache %s: unreadable entry %s (%s): a miss", self.name, key, exc)
            CACHE_LOOKUPS.labels(self.name, "corrupt").inc()
            return None
        CACHE_LOOKUPS.labels(self.name, "hit").inc()
        return value

    async def set(self, key: str, value) -> None:
        try:
            data = json.dumps({"format": FORMAT, "value": value}, separators=(",", ":"))
            await self.client.set(f"looksync:{self.name}:{key}", data, ex=int(self.ttl_s))
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
