"""Export Florence-2 (transformers `Florence2ForConditionalGeneration`) for grounding in Triton.

    python -m export florence2 --checkpoint /models/Florence-2-base --version 1
    python -m export florence2 --random-init --tiny --version 1     # CI: ~0.45 M params, 128 px
    python -m export florence2 --random-init --size large --version 1   # Florence-2-large shapes

Four ONNX graphs (see export/triton_vision/florence2_runtime.py for their inputs and outputs):
vision encoder; text+image encoder (token embeddings with the `<image>` positions replaced by
the image features, then the BART encoder); decoder-init (first step: logits, self- and
cross-attention KV); decoder-with-past (one token per step against the cache).

Why a KV cache rather than one decoder without cache: grounding answers are 5-10 tokens per box
plus the phrase, so 20-60 steps per look; without a cache every step re-runs the decoder over
the whole prefix and re-projects the cross-attention keys/values of ~600 encoder positions in
every layer, which makes a Florence-2-base step grow from ~12 ms to several times that by the
end of an answer. With the cache the cross K/V are computed once (decoder-init) and each step
is constant work. The cost is two graphs instead of one and the cache tensors crossing the
session boundary, which stays small (6 layers x 2 x (B, 12, L, 64)).

Tokenizer and processor: a checkpoint directory brings its own; with random weights they are
built offline (byte-level BART vocabulary, task and `<loc_0>`..`<loc_999>` tokens, and a
`post_processor_config` with the task keys: docs/ARCHITECTURE.md, "Export"). Either way
`save_pretrained` writes them into the version folder, and the python model in Triton tokenizes
with that `tokenizer.json` through Hugging Face `tokenizers` (checked against transformers'
processor here, prompt ids and the whole greedy loop).

`--tiny` with random weights also "imprints" the model: a few seconds of fitting so that it
answers every grounding prompt with one fixed phrase and box. Random weights alone almost
never emit location tokens, and the serving path (box parsing, SAM2 on the box, crops) needs
boxes to be exercised. `--no-imprint` turns it off.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.vision_common import (
    RUNTIME_FILES,
    Parity,
    VersionWriter,
    check_parity,
    export_onnx,
    log,
    offline,
    session,
)
from export.vision_configs import VisionPlan, florence2_ground_config, onnx_io, part_config

TINY_IMAGE = 128
TINY_VISION = dict(
    depths=[1, 1, 1, 1],
    embed_dim=[16, 32, 48, 64],
    num_heads=[1, 2, 3, 4],
    num_groups=[1, 2, 3, 4],
    window_size=4,
    projection_dim=64,
    max_position_embeddings=32,
    drop_path_rate=0.0,
)
TINY_TEXT = dict(
    d_model=64,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    max_position_embeddings=256,
)
# Florence-2-base's shapes (768 px; DaViT vision tower, 6+6-layer BART with d_model 768).
BASE_IMAGE = 768
BASE_VISION = dict(projection_dim=768, drop_path_rate=0.0)
BASE_TEXT = dict(
    d_model=768,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=12,
    decoder_attention_heads=12,
    encoder_ffn_dim=3072,
    decoder_ffn_dim=3072,
    max_position_embeddings=1024,
)
# Florence-2-large (0.77 B params): a wider DaViT, a 12+12-layer BART with d_model 1024.
LARGE_VISION = dict(
    embed_dim=[256, 512, 1024, 2048],
    num_heads=[8, 16, 32, 64],
    num_groups=[8, 16, 32, 64],
    projection_dim=1024,
    drop_path_rate=0.0,
)
LARGE_TEXT = dict(
    d_model=1024,
    encoder_layers=12,
    decoder_layers=12,
    encoder_attention_heads=16,
    decoder_attention_heads=16,
    encoder_ffn_dim=4096,
    decoder_ffn_dim=4096,
    max_position_embeddings=1024,
)
SIZES = {"tiny": (TINY_IMAGE, TINY_VISION, TINY_TEXT), "base": (BASE_IMAGE, BASE_VISION, BASE_TEXT),
         "large": (BASE_IMAGE, LARGE_VISION, LARGE_TEXT)}  # fmt: skip
TASK_TOKENS = ["<od>", "</od>", "<ocr>", "</ocr>", "<ground>", "</ground>", "<obj>", "</obj>", "<sep>"]
POST_PROCESSOR_TASKS = (
    "pure_text",
    "ocr",
    "phrase_grounding",
    "description_with_bboxes",
    "description_with_polygons",
    "polygons",
    "bboxes",
    "description_with_bboxes_or_polygons",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
IMPRINT_ANSWER = ("garment", (200, 150, 800, 900))  # phrase, location bins x0 y0 x1 y1
PARTS = ("vision_encoder", "encoder", "decoder_init", "decoder_step")
CODE_FILES = (*RUNTIME_FILES, "bart_tokenizer.py", "florence2_post.py", "florence2_runtime.py")


@dataclass
class Florence2Request:
    version: int
    target: str = "cpu"
    checkpoint: str | None = None
    tiny: bool = False  # the same as size "tiny"
    size: str = "base"  # random-init shapes: tiny | base | large
    imprint: bool = True  # tiny random-init only
    repository: Path = Path("model_repository")
    name: str = "florence2"
    seed: int = 0
    opset: int = 17
    onnx_threads: int = 0
    runner: str = ""  # "" = the target's default (cpu: inprocess, gpu: bls)
    max_new_tokens: int = 128


def build_processor(image_size: int):
    """Florence2Processor built offline: byte-level BART vocabulary + task and location tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import BartTokenizer, CLIPImageProcessor, Florence2Processor

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    vocab["<mask>"] = len(vocab)
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_tokens(TASK_TOKENS + [f"<loc_{i}>" for i in range(1000)])
    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        image_seq_length=(image_size // 32) ** 2 + 1,
    )
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config={task: {} for task in POST_PROCESSOR_TASKS},
    )


def build_model(req: Florence2Request):
    """(model in eval mode with eager attention, processor). Never downloads."""
    offline()
    import torch

    if req.tiny:
        # Tiny models are all overhead: on a small shared machine more threads only spin.
        torch.set_num_threads(1)
    from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    if req.checkpoint:
        processor = Florence2Processor.from_pretrained(req.checkpoint, local_files_only=True)
        model = Florence2ForConditionalGeneration.from_pretrained(
            req.checkpoint, local_files_only=True, attn_implementation="eager"
        )
        return model.eval(), processor
    size = "tiny" if req.tiny else req.size
    if size not in SIZES:
        raise SystemExit(f"florence2 size {size!r} is not one of {', '.join(SIZES)}")
    image, vision, text = SIZES[size]
    processor = build_processor(image)
    tok = processor.tokenizer
    text = dict(text)
    text.update(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
        forced_eos_token_id=tok.eos_token_id,
    )
    config = Florence2Config(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.image_token_id,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(req.seed)
    model = Florence2ForConditionalGeneration(config)
    if req.tiny and req.imprint:
        imprint(model, processor, seed=req.seed)
    return model.eval(), processor


def imprint(model, processor, seed: int = 0, steps: int = 200) -> float:
    """Fit the (tiny) model to answer every grounding prompt with IMPRINT_ANSWER; returns the loss."""
    import torch
    from PIL import Image

    tok = processor.tokenizer
    phrase, bins = IMPRINT_ANSWER
    answer = [tok.bos_token_id, *tok.encode(phrase, add_special_tokens=False)]
    answer += [tok.convert_tokens_to_ids(f"<loc_{b}>") for b in bins] + [tok.eos_token_id]
    start = model.config.text_config.decoder_start_token_id
    rng = np.random.default_rng(seed)
    words = ["t-shirt", "jeans", "red dress", "sneakers", "a blue denim jacket", "skirt", "hat"]
    side = processor.image_processor.size["height"]
    n = 4
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]
    prompts = [f"<CAPTION_TO_PHRASE_GROUNDING>{words[i % len(words)]}" for i in range(n)]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    labels = torch.tensor([answer] * n)
    decoder_input_ids = torch.tensor([[start, *answer[:-1]]] * n)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        out = model(**inputs, decoder_input_ids=decoder_input_ids)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
        # Done when greedy decoding already reproduces the answer with some margin.
        if loss.item() < 0.05 and bool((out.logits.argmax(-1) == labels).all()):
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def _layers(model) -> int:
    return int(model.config.text_config.decoder_layers)


def kv_names(prefix: str, layers: int, kinds=("self", "cross")) -> list[str]:
    return [f"{prefix}.{i}.{a}.{kv}" for i in range(layers) for a in kinds for kv in ("key", "value")]


def wrappers(model):
    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    core = model.model  # Florence2Model
    image_token = int(model.config.image_token_id)
    layers = _layers(model)

    class VisionEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.core = core

        def forward(self, pixel_values):
            return self.core.get_image_features(pixel_values).pooler_output

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.core = core

        def forward(self, input_ids, attention_mask, image_features):
            embeds = self.core.get_input_embeddings()(input_ids)
            is_image = input_ids == image_token
            # The k-th <image> position of a row takes the row's k-th image feature, which is
            # what masked_scatter does in Florence2Model, as a gather the exporters can trace.
            index = (is_image.long().cumsum(1) - 1).clamp(min=0)
            index = index.unsqueeze(-1).expand(-1, -1, image_features.shape[-1])
            gathered = torch.gather(image_features.to(embeds.dtype), 1, index)
            embeds = torch.where(is_image.unsqueeze(-1), gathered, embeds)
            out = self.core.language_model.encoder(attention_mask=attention_mask, inputs_embeds=embeds)
            return out.last_hidden_state

    def flat(cache) -> list:
        tensors = []
        for i in range(layers):
            for part in (cache.self_attention_cache, cache.cross_attention_cache):
                tensors += [part.layers[i].keys, part.layers[i].values]
        return tensors

    class DecoderInit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.core = core
            self.lm_head = model.lm_head

        def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask):
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            out = self.core.language_model.decoder(
                input_ids=decoder_input_ids,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                past_key_values=cache,
                use_cache=True,
            )
            return (self.lm_head(out.last_hidden_state), *flat(out.past_key_values))

    class DecoderStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.core = core
            self.lm_head = model.lm_head

        def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states, *past):
            own, cross = DynamicCache(), DynamicCache()
            for i in range(layers):
                own.update(past[4 * i], past[4 * i + 1], i)
                cross.update(past[4 * i + 2], past[4 * i + 3], i)
            cache = EncoderDecoderCache(own, cross)
            # encoder_hidden_states must be passed even with the cross K/V cached: without it
            # BART skips cross-attention altogether (found by running transformers' BART decoder).
            out = self.core.language_model.decoder(
                input_ids=input_ids,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                past_key_values=cache,
                use_cache=True,
            )
            new = out.past_key_values.self_attention_cache
            present = []
            for i in range(layers):
                present += [new.layers[i].keys, new.layers[i].values]
            return (self.lm_head(out.last_hidden_state), *present)

    return {
        "vision_encoder": VisionEncoder(),
        "encoder": Encoder(),
        "decoder_init": DecoderInit(),
        "decoder_step": DecoderStep(),
    }


def image_spec(processor) -> dict:
    ip = processor.image_processor
    size = ip.size
    height = int(size.get("height") or size.get("shortest_edge"))
    width = int(size.get("width") or size.get("shortest_edge"))
    if getattr(ip, "do_center_crop", False):
        raise SystemExit(
            "image processors that center-crop are not supported (Florence-2 resizes to a square)"
        )
    resample = ip.resample
    resample = _RESAMPLE_NAMES.get(int(getattr(resample, "value", resample)), "bicubic")
    return {
        "height": height,
        "width": width,
        "mean": [float(v) for v in ip.image_mean],
        "std": [float(v) for v in ip.image_std],
        "resample": resample,
        "rescale": float(getattr(ip, "rescale_factor", 1 / 255)),
    }


def _prompt_batch(processor, rng, n: int):
    """Processor inputs for n grounding prompts of different lengths (so some rows are padded)."""
    from PIL import Image

    side = processor.image_processor.size["height"]
    phrases = ["red t-shirt", "a pair of blue denim jeans with a brown leather belt", "hat", "white sneakers"]
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]
    prompts = [f"<CAPTION_TO_PHRASE_GROUNDING>{phrases[i % len(phrases)]}" for i in range(n)]
    return processor(text=prompts, images=images, return_tensors="pt", padding=True), prompts


def export_parts(req: Florence2Request, model, processor, out_dir: Path, t0: float):
    import torch

    mods = wrappers(model)
    for m in mods.values():
        m.eval()
    layers = _layers(model)
    rng = np.random.default_rng(req.seed)
    paths = {p: out_dir / f"{p}.onnx" for p in PARTS}
    example, _ = _prompt_batch(processor, rng, 2)
    pv, ids, mask = example["pixel_values"], example["input_ids"], example["attention_mask"]
    assert int(mask.min()) == 0, "the example must contain padding, or the trace may drop the mask"
    with torch.no_grad():
        feats = mods["vision_encoder"](pv)
        enc = mods["encoder"](ids, mask, feats)
        start = torch.full((2, 1), model.config.text_config.decoder_start_token_id, dtype=torch.long)
        init = mods["decoder_init"](start, enc, mask)
        # A self-attention past of 3 positions: the step graph must not bake in a past length
        # of 1, which is what decoder-init hands over.
        past = []
        for i in range(layers):
            s_k, s_v, c_k, c_v = init[1 + 4 * i : 1 + 4 * i + 4]
            past += [torch.cat([s_k] * 3, dim=2), torch.cat([s_v] * 3, dim=2), c_k, c_v]
    batch, seq = {0: "batch"}, {0: "batch", 1: "sequence"}
    enc_seq, dec_seq = {0: "batch", 1: "encoder_sequence"}, {0: "batch", 1: "decoder_sequence"}
    cross_kv = {0: "batch", 2: "encoder_sequence"}
    export_onnx(
        mods["vision_encoder"], (pv,), paths["vision_encoder"], ["pixel_values"], ["image_features"],
        {"pixel_values": batch, "image_features": batch}, req.opset,
    )  # fmt: skip
    export_onnx(
        mods["encoder"], (ids, mask, feats), paths["encoder"],
        ["input_ids", "attention_mask", "image_features"], ["encoder_hidden_states"],
        {"input_ids": seq, "attention_mask": seq, "image_features": batch, "encoder_hidden_states": seq},
        req.opset,
    )  # fmt: skip
    present_all = kv_names("present", layers)
    init_axes = {
        n: (cross_kv if ".cross." in n else {0: "batch", 2: "decoder_sequence"}) for n in present_all
    }
    export_onnx(
        mods["decoder_init"], (start, enc, mask), paths["decoder_init"],
        ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"], ["logits", *present_all],
        {"decoder_input_ids": dec_seq, "encoder_hidden_states": enc_seq, "encoder_attention_mask": enc_seq,
         "logits": dec_seq, **init_axes},
        req.opset,
    )  # fmt: skip
    past_names = kv_names("past", layers)
    present_self = kv_names("present", layers, ("self",))
    step_axes = {n: (cross_kv if ".cross." in n else {0: "batch", 2: "past"}) for n in past_names}
    step_axes.update({n: {0: "batch", 2: "past_plus_one"} for n in present_self})
    next_token = torch.full((2, 1), 7, dtype=torch.long)
    export_onnx(
        mods["decoder_step"], (next_token, mask, enc, *past), paths["decoder_step"],
        ["input_ids", "encoder_attention_mask", "encoder_hidden_states", *past_names], ["logits", *present_self],
        {"input_ids": batch, "encoder_attention_mask": enc_seq, "encoder_hidden_states": enc_seq, "logits": batch,
         **step_axes},
        req.opset,
    )  # fmt: skip
    log("exported " + ", ".join(PARTS), t0)
    return paths, part_parity(mods, paths, processor, model, rng)


def part_parity(mods, paths, processor, model, rng) -> list[Parity]:
    """Each graph against PyTorch at batch sizes and lengths that differ from the export example."""
    import torch

    layers = _layers(model)
    sessions = {p: session(path) for p, path in paths.items()}
    results = {p: Parity(f"florence2 {p}") for p in PARTS}
    start_id = model.config.text_config.decoder_start_token_id
    for n in (1, 3):
        inputs, _ = _prompt_batch(processor, rng, n)
        pv, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        with torch.no_grad():
            feats = mods["vision_encoder"](pv)
            enc = mods["encoder"](ids, mask, feats)
        (got,) = sessions["vision_encoder"].run(None, {"pixel_values": pv.numpy()})
        results["vision_encoder"].add(feats.numpy(), got)
        (got,) = sessions["encoder"].run(
            None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "image_features": feats.numpy()}
        )
        valid = mask.numpy().astype(bool)
        results["encoder"].add(enc.numpy()[valid], got[valid])
        tokens = torch.full((n, 1), start_id, dtype=torch.long)
        with torch.no_grad():
            ref = mods["decoder_init"](tokens, enc, mask)
        got = sessions["decoder_init"].run(
            None,
            {
                "decoder_input_ids": tokens.numpy(),
                "encoder_hidden_states": enc.numpy(),
                "encoder_attention_mask": mask.numpy(),
            },
        )
        for r, g in zip(ref, got):
            results["decoder_init"].add(r.numpy(), g)
        # Two steps on the cache: past lengths 1 and 2.
        past = list(ref[1:])
        step_inputs = [i.name for i in sessions["decoder_step"].get_inputs()]
        for _ in range(2):
            tokens = torch.from_numpy(rng.integers(5, 250, (n, 1)))
            with torch.no_grad():
                ref_step = mods["decoder_step"](tokens, mask, enc, *past)
            feeds = {
                "input_ids": tokens.numpy(),
                "encoder_attention_mask": mask.numpy(),
                "encoder_hidden_states": enc.numpy(),
            }
            feeds.update({name: t.numpy() for name, t in zip(kv_names("past", layers), past)})
            got = sessions["decoder_step"].run(None, {k: feeds[k] for k in step_inputs})
            for r, g in zip(ref_step, got):
                results["decoder_step"].add(r.numpy(), g)
            new_self = list(ref_step[1:])
            past = [
                new_self[2 * i + j] if j < 2 else past[4 * i + j] for i in range(layers) for j in range(4)
            ]
    return [results[p] for p in PARTS]


def generation_meta(model, max_new_tokens: int) -> dict:
    gen = model.generation_config
    text = model.config.text_config

    def pick(name):
        value = getattr(gen, name, None)
        return value if value is not None else getattr(text, name, None)

    eos = pick("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    return {
        "decoder_start_token_id": int(pick("decoder_start_token_id")),
        "eos_token_id": int(eos),
        "pad_token_id": int(pick("pad_token_id")),
        "forced_bos_token_id": pick("forced_bos_token_id"),
        "forced_eos_token_id": pick("forced_eos_token_id"),
        "max_new_tokens": int(max_new_tokens),
    }


def pipeline_parity(model, processor, meta: dict, version_dir: Path, rng) -> dict:
    """Tokenizer, and the whole greedy loop over the ONNX parts, against transformers."""
    import torch
    from transformers import GenerationConfig

    from export.triton_vision.bart_tokenizer import BartTokenizer
    from export.triton_vision.florence2_runtime import Florence2Grounder, Florence2Spec
    from export.triton_vision.onnx_parts import InProcessParts

    tok = BartTokenizer(str(version_dir / meta["tokenizer"]))
    spec = Florence2Spec.from_json(meta)
    grounder = Florence2Grounder(spec, tok, InProcessParts(str(version_dir), meta["parts"]))
    inputs, prompts = _prompt_batch(processor, rng, 3)
    phrases = [p.replace("<CAPTION_TO_PHRASE_GROUNDING>", "") for p in prompts]
    rows = [grounder.prompt_ids("<CAPTION_TO_PHRASE_GROUNDING>", p) for p in phrases]
    mask = inputs["attention_mask"].numpy().astype(bool)
    expected = [inputs["input_ids"][i][mask[i]].tolist() for i in range(len(rows))]
    if rows != expected:
        raise SystemExit(f"the serving tokenizer differs from transformers':\n{rows}\n{expected}")
    gen = meta["generation"]
    steps = 24
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=steps,
        decoder_start_token_id=gen["decoder_start_token_id"],
        eos_token_id=gen["eos_token_id"],
        pad_token_id=gen["pad_token_id"],
        forced_bos_token_id=gen["forced_bos_token_id"],
        forced_eos_token_id=gen["forced_eos_token_id"],
    )
    with torch.no_grad():
        ref = model.generate(**inputs, generation_config=config).tolist()
    got = grounder.generate(inputs["pixel_values"].numpy(), rows, steps)
    ref = [[t for t in r if t != gen["pad_token_id"]] for r in ref]
    if got != ref:
        raise SystemExit(f"greedy decoding over ONNX differs from model.generate:\n{got}\n{ref}")
    texts = [tok.decode(s[1:]) for s in got]
    hf_texts = processor.batch_decode([s[1:] for s in ref], skip_special_tokens=False)
    if texts != hf_texts:
        raise SystemExit(f"plain-Python decode differs from transformers':\n{texts}\n{hf_texts}")
    return {"tokens_equal": True, "rows": len(rows), "max_new_tokens": steps, "sample_text": texts[0]}


def export_florence2(req: Florence2Request) -> Path:
    t0 = time.monotonic()
    plan = VisionPlan(target=req.target, runner=req.runner, onnx_threads=req.onnx_threads)
    model, processor = build_model(req)
    spec = image_spec(processor)
    log(
        f"built Florence-2 ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, {spec['height']} px)",
        t0,
    )
    orchestrator = f"{req.name}_ground"
    part_models = {p: f"{req.name}_{p}" for p in PARTS}
    bls = plan.effective_runner == "bls"
    writer = VersionWriter(req.repository, req.version, [*part_models.values()] * bls + [orchestrator])
    try:
        out = writer[orchestrator]
        paths, parity = export_parts(req, model, processor, out, t0)
        check_parity(parity, writer, t0)
        processor.save_pretrained(str(out / "processor"))
        meta = {
            "model": req.name,
            "version": req.version,
            "weights": req.checkpoint or f"random-init(seed={req.seed}, {'tiny' if req.tiny else req.size})",
            "imprinted": bool(req.tiny and req.imprint and not req.checkpoint),
            "image": spec,
            "image_seq_length": int(processor.num_image_tokens),
            "decoder_layers": _layers(model),
            "max_source_positions": int(model.config.text_config.max_position_embeddings),
            "generation": generation_meta(model, req.max_new_tokens),
            "tokenizer": "processor/tokenizer.json",
            "runner": "inprocess",
            "parts": {},
            "parity": {p.part: p.as_json() for p in parity},
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for part, path in paths.items():
            inputs, outputs = onnx_io(path)
            meta["parts"][part] = {
                "file": path.name,
                "triton_model": part_models[part],
                "inputs": [t.name for t in inputs],
                "outputs": [t.name for t in outputs],
            }
        meta["pipeline_parity"] = pipeline_parity(
            model, processor, meta, out, np.random.default_rng(req.seed + 1)
        )
        log(
            f"parity greedy decode: token-for-token equal to model.generate ({meta['pipeline_parity']['sample_text']!r})",
            t0,
        )
        meta["runner"] = plan.effective_runner
        if bls:
            for part, path in paths.items():
                target = writer[part_models[part]]
                path.rename(target / "model.onnx")
                if Path(f"{path}.data").exists():  # the graph refers to its data file by this name
                    Path(f"{path}.data").rename(target / f"{path.name}.data")
                if req.target == "cpu":
                    writer.copy_code(part_models[part], "onnx_part.py", ())
                inputs, outputs = onnx_io(target / "model.onnx")
                writer.configs[part_models[part]] = part_config(plan, part_models[part], inputs, outputs)
        (out / "florence2.json").write_text(json.dumps(meta, indent=2))
        writer.copy_code(orchestrator, "florence2_ground.py", CODE_FILES)
        writer.configs[orchestrator] = florence2_ground_config(plan, orchestrator)
        final = writer.commit()
    except BaseException:
        writer.abort()
        raise
    log(
        f"wrote {orchestrator} version {req.version} ({req.target} target, runner {plan.effective_runner})",
        t0,
    )
    return final[orchestrator]
