"""FLOPs per look of the real-sized SAM2 and Florence-2 models, counted by PyTorch.

    python -m benchmarks.vision_flops [--phrases 3] [--answer-tokens 10]

Method: build each model from its published configuration with random weights (the count
does not depend on the weights), run the exact graphs we export once at batch 1 under
`torch.utils.flop_counter.FlopCounterMode`, which counts 2 x multiply-accumulates of every
matmul, convolution and attention kernel (elementwise ops, norms and softmax are not counted;
they are a few percent). A look is then: SAM2 image encoder once + one mask-decoder call with
one box per phrase; Florence-2 vision encoder once (the serving model encodes a look once for
all phrases batched with it) + per phrase the text+image encoder over the prompt and
decoder-init plus (answer tokens - 1) decoder steps with the KV cache.

Configurations (transformers' classes; sizes from the published checkpoints):
- Florence-2-base: DaViT (embed 128/256/512/1024, depths 1/1/9/1, window 12) at 768 px
  (577 image tokens), BART 6+6 layers d_model 768, vocabulary 51289.
- SAM2.1 hiera-tiny: Hiera 96/192/384/768, blocks 1/2/7/2, 1024 px (transformers' defaults).
- SAM2.1 hiera-large: Hiera 144/288/576/1152, blocks 2/6/36/4, global attention in blocks
  23/33/43, windows 8/4/16/8, 1024 px.
"""

from __future__ import annotations

import argparse
import os


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    # No torch.no_grad() here: FlopCounterMode's module tracker then fails on outputs without
    # a grad_fn. The models' parameters are frozen instead.
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


SAM2_LARGE_BACKBONE = dict(
    model_type="sam2_hiera_det_model",
    hidden_size=144,
    num_attention_heads=2,
    blocks_per_stage=[2, 6, 36, 4],
    embed_dim_per_stage=[144, 288, 576, 1152],
    num_attention_heads_per_stage=[2, 4, 8, 16],
    window_size_per_stage=[8, 4, 16, 8],
    global_attention_blocks=[23, 33, 43],
)


def sam2_flops(large: bool, boxes: int) -> dict[str, float]:
    import torch
    from transformers import Sam2Config, Sam2Model

    from export.sam2 import wrappers

    if large:
        config = Sam2Config(
            vision_config=dict(
                backbone_config=SAM2_LARGE_BACKBONE, backbone_channel_list=[1152, 576, 288, 144]
            )
        )
    else:
        config = Sam2Config()
    model = Sam2Model(config).eval().requires_grad_(False)
    encoder, decoder = wrappers(model)
    pixels = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        feats = encoder(pixels)
    box = torch.tensor([[[100.0, 100.0, 600.0, 900.0]] * boxes])
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {
        "params_M": params,
        "image_encoder": _flops(lambda: encoder(pixels)),
        "mask_decoder": _flops(lambda: decoder(*feats, box)),
    }


def florence2_flops(phrases: int, answer_tokens: int) -> dict[str, float]:
    import torch
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    from export.florence2 import BASE_TEXT, BASE_VISION, wrappers

    text = dict(
        BASE_TEXT, vocab_size=51289, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2
    )
    config = Florence2Config(vision_config=BASE_VISION, text_config=text, image_token_id=51289 - 1)
    config._attn_implementation = "eager"
    model = Florence2ForConditionalGeneration(config).eval().requires_grad_(False)
    mods = wrappers(model)
    image_tokens = (768 // 32) ** 2 + 1
    prompt = image_tokens + 2 + 12  # <image>x577 <s> "Locate the phrases in the caption: ..." </s>
    pixels = torch.randn(1, 3, 768, 768)
    ids = torch.full((1, prompt), 100)
    ids[0, :image_tokens] = config.image_token_id
    mask = torch.ones(1, prompt, dtype=torch.long)
    with torch.no_grad():
        feats = mods["vision_encoder"](pixels)
        enc = mods["encoder"](ids, mask, feats)
        start = torch.full((1, 1), 2)
        init = mods["decoder_init"](start, enc, mask)
    layers = config.text_config.decoder_layers
    middle = answer_tokens // 2  # the cost of a step grows slowly with its past; take the middle one
    past = []
    for i in range(layers):
        s_k, s_v, c_k, c_v = init[1 + 4 * i : 5 + 4 * i]
        past += [s_k.repeat(1, 1, middle, 1), s_v.repeat(1, 1, middle, 1), c_k, c_v]
    vision = _flops(lambda: mods["vision_encoder"](pixels))
    encoder = _flops(lambda: mods["encoder"](ids, mask, feats))
    decoder_init = _flops(lambda: mods["decoder_init"](start, enc, mask))
    step = _flops(lambda: mods["decoder_step"](start, mask, enc, *past))
    per_phrase = encoder + decoder_init + (answer_tokens - 1) * step
    return {
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "vision_encoder": vision,
        "encoder (per phrase)": encoder,
        "decoder_init (per phrase)": decoder_init,
        "decoder_step (per token)": step,
        "look": vision + phrases * per_phrase,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phrases", type=int, default=3, help="garment layers grounded per look")
    parser.add_argument(
        "--answer-tokens", type=int, default=10, help="tokens Florence-2 generates per phrase"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.manual_seed(0)
    florence = florence2_flops(args.phrases, args.answer_tokens)
    print(f"Florence-2-base ({florence.pop('params_M'):.1f} M params, 768 px), GFLOP:")
    for name, value in florence.items():
        print(f"  {name}: {value:.2f}")
    for large in (False, True):
        sam = sam2_flops(large, args.phrases)
        name = "SAM2.1 hiera-large" if large else "SAM2.1 hiera-tiny"
        look = sam["image_encoder"] + sam["mask_decoder"]
        print(
            f"{name} ({sam['params_M']:.1f} M params, 1024 px), GFLOP: image_encoder {sam['image_encoder']:.1f}, "
            f"mask_decoder ({args.phrases} boxes) {sam['mask_decoder']:.2f}, look {look:.1f}"
        )


if __name__ == "__main__":
    main()
