"""`looksync demo`: the main job end to end on the embedded default.

export a CLIP version (tiny config, random weights, unless one exists) -> start Triton ->
generate the sample catalog -> index it -> start the gateway -> search by text and by image
over gRPC -> write a contact sheet -> stop what it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from clients.client import FilterArgs, LookSyncClient
from gateway.settings import Settings, get_settings
from gateway.tritonserver import TritonServer, models_in


def _step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


DEMO_WEIGHTS = Path(__file__).resolve().parent.parent / "export" / "weights" / "looksync-demo.pt"


def _ensure_model(settings: Settings) -> None:
    repo = settings.model_repository
    if f"{settings.embedding_model}_image" in models_in(repo):
        print(f"using the exported model versions in {repo}")
        return
    from export.clip import ExportRequest, export_clip

    if DEMO_WEIGHTS.exists():
        print(f"exporting the demo CLIP trained on the synthetic world ({DEMO_WEIGHTS.name})")
        arch, checkpoint = "looksync-demo", str(DEMO_WEIGHTS)
    else:
        print("no demo weights: exporting the tiny CLIP config (random weights)")
        arch, checkpoint = "looksync-tiny", None
    export_clip(
        ExportRequest(
            arch=arch, version=1, name=settings.embedding_model, checkpoint=checkpoint, repository=repo
        )
    )


def _ensure_detector(settings: Settings) -> None:
    """The garment detector next to the CLIP (looks without an LLM find garments anywhere)."""
    from export.detector import WEIGHTS, DetectorExport, export_detector

    repo = settings.model_repository
    if settings.localizer != "detector" or settings.detector_model in models_in(repo):
        return
    if not WEIGHTS.exists():
        print("no garment detector weights: look search cuts body zones")
        return
    print(f"exporting the garment detector trained on the synthetic world ({WEIGHTS.name})")
    export_detector(
        DetectorExport(version=1, repository=repo, checkpoint=WEIGHTS, name=settings.detector_model)
    )


def _index(settings: Settings, catalog: Path) -> None:
    from gateway.embedder import TritonEmbedder
    from gateway.indexer import Indexer, index_catalog, resolve_space
    from gateway.server import open_index

    async def run():
        embedder = TritonEmbedder(settings.triton_url)
        index = open_index(settings)
        try:
            space = await resolve_space(embedder, settings.embedding_model, None)
            report = await index_catalog(catalog, Indexer(embedder, index, space))
        finally:
            await embedder.close()
            await index.close()
        print(
            f"indexed {report.written} products into {space.index_name} in {report.wall_s:.1f}s "
            f"({report.embedded} embedded, {report.unchanged} unchanged, {len(report.failed)} failed)"
        )

    asyncio.run(run())


def _dedup(settings: Settings) -> None:
    from gateway.dedup import run_dedup

    r = asyncio.run(run_dedup(settings, full=True))
    print(
        f"dedup: {r.listings} listings in {r.items} items, {r.grouped_items} of them sold by several "
        f"retailers ({r.wall_s:.1f}s)"
    )


def _calibrate(settings: Settings) -> None:
    from gateway.calibrate import calibrate_dedup

    space, result = asyncio.run(calibrate_dedup(settings, None, None, None, 0.995))
    print(f"near-duplicate threshold of {space}: {result.summary()}")


def _wait_serving(client: LookSyncClient, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the gateway exited during start-up; see .looksync/gateway.log")
        try:
            if client.health() == "SERVING":
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise SystemExit("the gateway did not become SERVING in time")


def _show(title: str, resp) -> None:
    print(f"\n{title}")
    for rank, hit in enumerate(resp.hits, 1):
        p = hit.product
        print(
            f"  {rank}. {hit.score:.3f} {p.id} {p.title} | {p.brand} | {p.retailer} | {p.gender} {p.market} "
            f"{p.price:.2f} {p.currency}" + (f" (+{len(hit.offers)} offers)" if hit.offers else "")
        )
    print("  timings: " + ", ".join(f"{t.stage} {t.ms:.1f} ms" for t in resp.timings))


def _contact_sheet(rows: list[tuple[Path, list[Path]]], out: Path, size: int = 112) -> None:
    sheet = Image.new("RGB", (size * 6 + 10, size * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (query, hits) in enumerate(rows):
        sheet.paste(Image.open(query).convert("RGB").resize((size, size)), (0, r * size))
        for c, hit in enumerate(hits[:5]):
            sheet.paste(Image.open(hit).convert("RGB").resize((size, size)), (10 + size * (c + 1), r * size))
        draw.line((size + 4, r * size, size + 4, (r + 1) * size), fill="black", width=2)
    sheet.save(out)


def _offline(settings: Settings, client: LookSyncClient, world: Path, manifest: dict, item_of: dict) -> None:
    """The world's looks matched in one batch, as the app's looks are ahead of time, and one of
    them served by id with the catalog's current state (GetLookMatches)."""
    from gateway.offline.job import MatchOptions, match_looks

    looks = world / "looks.jsonl"
    looks.write_text(
        "".join(
            json.dumps({"look_id": f"look-{i}", "image": t["image"]}) + "\n"
            for i, t in enumerate(manifest["looks"])
        )
    )
    print("\noffline: looksync match-looks " + str(looks))
    report, summary = asyncio.run(match_looks(settings, MatchOptions(manifest=looks, progress=False)))
    print("  " + summary)
    resp = client.get_look_matches("look-0", k_per_layer=3, filters=FilterArgs(in_stock_only=True))
    when = time.strftime("%H:%M:%S", time.gmtime(resp.computed_at_unix))
    print(f"get-look look-0 --in-stock: {resp.source}, computed {when} UTC, {len(resp.layers)} garments")
    truth = set(manifest["looks"][0]["garments"].values())
    for layer in resp.layers:
        marks = ", ".join(
            f"{h.product.id}{'*' if item_of[h.product.id] in truth else ''}" for h in layer.hits
        )
        print(f'  [{layer.layer}] "{layer.query}": {marks}')
    print("  timings: " + ", ".join(f"{t.stage} {t.ms:.1f} ms" for t in resp.timings))


def run_demo(keep_running: bool = False) -> int:
    settings = get_settings()
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)

    _step("1/5 model: CLIP exported to ONNX in the Triton model repository")
    _ensure_model(settings)
    _ensure_detector(settings)

    _step("2/5 Triton: the real tritonserver on the CPU target")
    triton = TritonServer(
        settings.model_repository,
        settings.triton_http_port,
        settings.triton_grpc_port,
        settings.triton_metrics_port,
        work_dir=data / "triton",
    )
    started_triton = not triton.ready()
    if started_triton:
        triton.start(log_file=open(data / "triton.log", "a"))
        print(f"tritonserver ready (gRPC {settings.triton_url}); log in {data / 'triton.log'}")
    else:
        print("tritonserver already running; using it")

    gateway = None
    try:
        _step("3/5 catalog: the synthetic fashion world, embedded and indexed (LanceDB)")
        from clients.world import write_world

        world = data / "world"
        # Not the training seed; a fifth of the products is also sold by 1-3 other retailers. Half
        # of the looks are easy (a centred full-length figure), half as AI looks really come (the
        # figure anywhere, cut off, layered, with bags and accessories, on busy backgrounds).
        manifest = write_world(world, products=400, looks=12, seed=2001, duplicates=0.2, difficulty="mixed")
        catalog = world / "catalog.jsonl"
        image_of = {
            r["id"]: world / r["image_url"] for r in map(json.loads, catalog.read_text().splitlines())
        }
        item_of = manifest["items"]
        _index(settings, catalog)
        _calibrate(settings)
        _dedup(settings)

        _step("4/5 gateway: gRPC on " + settings.gateway_url)
        env = dict(os.environ)
        if not DEMO_WEIGHTS.exists():
            # The random-weight tiny model puts every image within cosine ~0.99 of every other, so
            # the production near-duplicate threshold (0.97, for real CLIP) would merge everything.
            env.setdefault("LOOKSYNC_DEDUP_THRESHOLD", "0.9999")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "clients.cli", "serve"],
            env=env,
            stdout=open(data / "gateway.log", "a"),
            stderr=subprocess.STDOUT,
        )
        client = LookSyncClient(settings.gateway_url)
        _wait_serving(client, gateway)

        _step("5/5 searches over gRPC")
        r1 = client.search_text("a red striped short-sleeve t-shirt", k=5)
        _show('search-text "a red striped short-sleeve t-shirt"', r1)
        r2 = client.search_text(
            "a blue midi dress",
            k=5,
            filters=FilterArgs(categories=("dress",), max_price=150, in_stock_only=True),
        )
        _show('search-text "a blue midi dress" --category dress --max-price 150 --in-stock', r2)
        # A product sold by several retailers: one hit, its other listings as offers.
        sold_by = {}
        for pid, item in item_of.items():
            sold_by.setdefault(item, []).append(pid)
        shared = min(i for i, listings in sold_by.items() if len(listings) >= 3)
        query = image_of[shared]
        r3 = client.search_image(query.read_bytes(), k=5)
        _show(f"search-image {query.name} (a catalog product's own image: its item should come first)", r3)
        first = r3.hits[0]
        print(
            f"  item {first.product.item_id or first.product.id}: {first.product.id} at {first.product.retailer}"
        )
        for offer in first.offers:
            print(
                f"    also at {offer.retailer}: {offer.product_id} {offer.price:.2f} {offer.currency} "
                f"{offer.market} {'in stock' if offer.in_stock else 'sold out'} {offer.product_url}"
            )

        rows = [(query, [image_of[h.product.id] for h in r3.hits])]
        found = total = 0
        easy = [look for look in manifest["looks"] if look["difficulty"]["level"] == "easy"]
        hard = [look for look in manifest["looks"] if look["difficulty"]["level"] == "hard"]
        for look in easy[:2] + hard[:2]:
            path = world / look["image"]
            resp = client.search_look(path.read_bytes(), k_per_layer=5)
            truth = set(look["garments"].values())
            level = look["difficulty"]
            framing = (
                ""
                if level["level"] == "easy"
                else f"; {level['crop']}, {level['position']}, {level['background']}, {level['layering']}"
            )
            print(
                f"\nsearch-look {look['image']} ({level['level']}{framing}; "
                f"worn variations of {', '.join(sorted(truth))})"
            )
            for layer in resp.layers:
                ids = [h.product.id for h in layer.hits]
                # A hit counts when it is any listing of the worn item (another retailer's too).
                marks = ", ".join(f"{i}{'*' if item_of[i] in truth else ''}" for i in ids)
                b = layer.box
                print(
                    f'  [{layer.layer}] "{layer.query}" at ({b.left},{b.top})-({b.right},{b.bottom}) '
                    f"by {layer.region_source or '-'} ({layer.query_source}, {layer.rerank_source}): {marks}"
                )
                rows.append((path, [image_of[i] for i in ids]))
            found += len(truth & {item_of[h.product.id] for layer in resp.layers for h in layer.hits})
            total += len(truth)
            print("  timings: " + ", ".join(f"{t.stage} {t.ms:.1f} ms" for t in resp.timings))
        print(f"\nsource garments found in the top 5 of their layer: {found}/{total} (* marks them)")
        _offline(settings, client, world, manifest, item_of)
        sheet = data / "demo-contact-sheet.png"
        _contact_sheet(rows, sheet)
        print(f"contact sheet (query | top 5): {sheet}")
        if keep_running:
            print("\nTriton and the gateway keep running; try: .venv/bin/looksync search-text 'blue jeans'")
            gateway = None
            started_triton = False
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(15)
        if started_triton:
            triton.stop()
    return 0
