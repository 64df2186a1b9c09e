"""Prepare a MOS study: run looks through one or more systems (a gateway, optionally a named
embedding space on it) and write a self-contained task folder an annotator's page serves:

    tasks.json            systems, items (one look x one system) and pairs (one look x two systems)
    img/looks/...         the look images
    img/products/...      the product images of every result (copied, so the folder travels)

Which system produced an item is in tasks.json for the report, never on the annotator's page.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from clients.client import LookSyncClient


@dataclass(frozen=True)
class System:
    name: str
    address: str
    space: tuple[str, int] | None = None  # (model, version); None: what the alias serves

    @classmethod
    def parse(cls, spec: str) -> System:
        """name=host:port or name=host:port/model:version"""
        name, sep, rest = spec.partition("=")
        address, _, space = rest.partition("/")
        if not sep or not name or not address:
            raise ValueError(f"system {spec!r}: expected name=host:port[/model:version]")
        if space:
            model, _, version = space.partition(":")
            if not model or not version.isdigit():
                raise ValueError(f"system {spec!r}: the space must be model:version, e.g. clip:2")
            return cls(name, address, (model, int(version)))
        return cls(name, address)


def world_looks(world: Path, limit: int | None = None) -> list[dict]:
    """Looks of a synthetic world (clients/world.py) with their gender: the most common
    non-unisex gender of the garments they vary."""
    manifest = json.loads((Path(world) / "looks.json").read_text())
    attributes = manifest["attributes"]
    looks = []
    for look in manifest["looks"][:limit]:
        genders = Counter(attributes[pid]["gender"] for pid in look["garments"].values())
        genders.pop("unisex", None)
        gender = genders.most_common(1)[0][0] if genders else "unisex"
        looks.append({"id": look["id"], "image": Path(world) / look["image"], "gender": gender})
    return looks


def _opaque(*parts: str) -> str:
    """An id that does not name the system: ids go into the annotator's page (form fields)."""
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _copy_image(source: str, root: Path, out: Path, folder: str) -> str:
    """The image as a path inside the task folder, or its URL when it is remote."""
    if source.startswith(("http://", "https://")):
        return source
    path = Path(source) if Path(source).is_absolute() else root / source
    if not path.is_file():
        return ""
    name = hashlib.sha1(str(path).encode()).hexdigest()[:16] + path.suffix.lower()
    target = out / "img" / folder / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return f"img/{folder}/{name}"


def prepare(
    looks: list[dict],
    systems: list[System],
    out: Path,
    catalog_root: Path,
    k: int = 5,
    timeout_s: float = 30.0,
    progress: bool = True,
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    catalog_root = Path(catalog_root).resolve()
    if len({s.name for s in systems}) != len(systems):
        raise ValueError("system names must be distinct")
    items, pairs = [], []
    for n, look in enumerate(looks, 1):
        image = Path(look["image"]).read_bytes()
        # Resolved here: a relative world path (`--world .looksync/world`) is relative to where
        # the command runs, not to the filesystem root.
        look_image = _copy_image(str(Path(look["image"]).resolve()), Path("/"), out, "looks")
        per_system = {}
        for system in systems:
            with LookSyncClient(system.address) as client:
                resp = client.search_look(image, k_per_layer=k, space=system.space, timeout_s=timeout_s)
            item = {
                "id": _opaque(look["id"], system.name),
                "look": look["id"],
                "gender": look["gender"],
                "image": look_image,
                "system": system.name,
                "space": f"{resp.space.model} v{resp.space.version}",
                "layers": [
                    {
                        "layer": layer.layer,
                        "query": layer.query,
                        "products": [
                            {
                                "id": h.product.id,
                                "title": h.product.title,
                                "brand": h.product.brand,
                                "price": h.product.price,
                                "currency": h.product.currency,
                                "image": _copy_image(h.product.image_url, catalog_root, out, "products"),
                            }
                            for h in layer.hits
                        ],
                    }
                    for layer in resp.layers
                ],
            }
            items.append(item)
            per_system[system.name] = item["id"]
        for a, b in combinations(sorted(per_system), 2):
            pairs.append(
                {
                    "id": _opaque(look["id"], a, b),
                    "look": look["id"],
                    "gender": look["gender"],
                    "items": [per_system[a], per_system[b]],
                }
            )
        if progress:
            print(f"\r[mos prepare] {n}/{len(looks)} looks", end="", flush=True)
    if progress:
        print()
    tasks = {"systems": [s.name for s in systems], "items": items, "pairs": pairs}
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1))
    return tasks
