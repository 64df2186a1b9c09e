"""Train the demo CLIP on the synthetic fashion world (clients/world.py), on the CPU.

    python -m export.train_demo --minutes 10 --out export/weights/looksync-demo.pt

Contrastive (image, caption) pairs: catalog renderings, and the body-zone crops of looks that
wear variations of catalog items, captioned exactly like the item they came from. Training on
the query distribution is what makes look -> garment work: without the crops, look -> garment
recall in a prototype was far lower, and crops captioned "a person wearing ..." lost most of
the gain (docs/ARCHITECTURE.md, "Export"). Reproducible from the seed up to the number of steps
the time budget allows; the record next to the weights says how many ran, the loss curve and
the evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np

from clients.world import KINDS, look_crops, make_catalog, make_looks, render, render_look
from export.finetune import contrastive_loss

HERE = Path(__file__).resolve().parent
ZONE_KINDS = {
    "upper": ("t-shirt", "shirt", "jacket", "dress"),
    "lower": ("trousers", "skirt", "dress"),
    "feet": ("sneakers",),
}


def _pixels(img, size: int) -> np.ndarray:
    from export.triton.preprocess import ImageSpec, pixels

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    return pixels(img, ImageSpec(size, mean, std))


def build_pairs(seed: int, products: int, looks: int, size: int):
    """(pixels, caption) for catalog renders and look crops."""
    catalog = make_catalog(products, seed)
    by_id = {p.id: p for p in catalog}
    images, captions = [], []
    for p in catalog:
        images.append(_pixels(render(p.style, size=size), size))
        captions.append(p.style.caption)
    for look in make_looks(catalog, looks, seed + 7):
        crops = look_crops(render_look(look, seed))
        for zone, crop in crops.items():
            source = look.garments.get(zone) or (
                look.garments.get("dress") if zone in ("upper", "lower") else None
            )
            if source is None:
                continue
            images.append(_pixels(crop, size))
            captions.append(by_id[source].style.caption)
    return np.stack(images), captions


def evaluate(model, tokenizer, seed: int, size: int, n_products: int = 400, n_looks: int = 100) -> dict:
    """Held-out world (other seed): caption -> image and look crop -> garment Recall@k."""
    import torch

    catalog = make_catalog(n_products, seed)
    looks = make_looks(catalog, n_looks, seed + 1)
    with torch.no_grad():
        cat = model.encode_image(
            torch.from_numpy(np.stack([_pixels(render(p.style, size=size), size) for p in catalog])),
            normalize=True,
        ).numpy()
        txt = model.encode_text(tokenizer([p.style.caption for p in catalog]), normalize=True).numpy()
        kinds = np.array([p.style.kind for p in catalog])
        # caption -> image: is the item among the top 5 images for its caption?
        sims = txt @ cat.T
        order = np.argsort(-sims, axis=1)
        caption_r5 = float(np.mean([i in order[i, :5] for i in range(len(catalog))]))
        hits = {1: [], 5: [], 10: []}
        queries = []
        for look in looks:
            crops = look_crops(render_look(look, seed))
            for zone, crop in crops.items():
                source = look.garments.get(zone) or (
                    look.garments.get("dress") if zone in ("upper", "lower") else None
                )
                if source is not None:
                    queries.append((zone, source, _pixels(crop, size)))
        qv = model.encode_image(torch.from_numpy(np.stack([q[2] for q in queries])), normalize=True).numpy()
        for (zone, source, _), q in zip(queries, qv):
            allowed = np.isin(kinds, ZONE_KINDS[zone])  # the zone's category filter, as in SearchLook
            scores = np.where(allowed, cat @ q, -np.inf)
            ranked = [catalog[i].id for i in np.argsort(-scores)[:10]]
            for k in hits:
                hits[k].append(source in ranked[:k])
    return {
        "caption_to_image_r5": round(caption_r5, 3),
        **{f"look_to_garment_r{k}": round(float(np.mean(v)), 3) for k, v in hits.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=HERE / "weights" / "looksync-demo.pt")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--products", type=int, default=800)
    parser.add_argument("--looks", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import open_clip
    import torch

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    open_clip.add_model_config(HERE / "configs")
    model = open_clip.create_model("looksync-demo", pretrained=None)
    tokenizer = open_clip.get_tokenizer("looksync-demo")
    size = model.visual.preprocess_cfg["size"][0]
    t0 = time.monotonic()
    images, captions = build_pairs(args.seed, args.products, args.looks, size)
    tokens = tokenizer(captions)
    print(
        f"[train] {len(images)} pairs built in {time.monotonic() - t0:.0f}s "
        f"({len(set(captions))} distinct captions; kinds {', '.join(KINDS)})",
        flush=True,
    )

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    budget = args.minutes * 60
    start, step, losses = time.monotonic(), 0, []
    est_steps = None
    model.train()
    gen = torch.Generator().manual_seed(args.seed)
    while time.monotonic() - start < budget:
        idx = torch.randint(0, len(images), (args.batch,), generator=gen)
        x = torch.from_numpy(images[idx.numpy()])
        if step % 2:
            x = torch.flip(x, dims=[3])  # mirror: garments are symmetric enough
        ids = tokens[idx]
        # cosine schedule over the time budget (steps are not known in advance)
        frac = min(1.0, (time.monotonic() - start) / budget)
        warm = min(1.0, (step + 1) / 30)
        for g in opt.param_groups:
            g["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * frac))
        # Same caption = same target: several images share a caption, so targets are soft.
        loss, _, _ = contrastive_loss(model, x, ids, bf16=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            elapsed = time.monotonic() - start
            est_steps = int(step * budget / elapsed)
            print(
                f"[train] step {step}/~{est_steps} loss {np.mean(losses[-25:]):.3f} "
                f"({elapsed:.0f}s of {budget:.0f}s)",
                flush=True,
            )
    model.eval()
    evaluation = evaluate(model, tokenizer, seed=args.seed + 1000, size=size)
    print(
        f"[train] {step} steps in {time.monotonic() - start:.0f}s; held-out evaluation: {evaluation}",
        flush=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # fp16 on disk halves the committed file; export loads it into an fp32 model.
    torch.save({k: v.half() for k, v in model.state_dict().items()}, args.out)
    record = {
        "arch": "looksync-demo",
        "seed": args.seed,
        "minutes": args.minutes,
        "steps": step,
        "batch": args.batch,
        "lr": args.lr,
        "pairs": len(images),
        "products": args.products,
        "looks": args.looks,
        "loss_every_25_steps": [
            round(float(np.mean(losses[i : i + 25])), 4) for i in range(0, len(losses), 25)
        ],
        "evaluation_held_out": evaluation,
        "command": f"python -m export.train_demo --minutes {args.minutes} --seed {args.seed}",
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"[train] wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) and its record", flush=True)


if __name__ == "__main__":
    main()
