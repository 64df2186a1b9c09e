"""SAM2 and Florence-2 exports: per-part parity, the serving code against transformers, configs,
location-token parsing on hand-written strings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from export.triton_vision.bart_tokenizer import BartTokenizer
from export.triton_vision.florence2_post import Box, dequantize, parse_location_text
from export.triton_vision.image_ops import resize_bilinear
from tests.vision_fixtures import tiny_vision_repo

# ---------------------------------------------------------------- location tokens (pure) --


def _boxes(text, size=(1000, 500)):
    return [(b.label, tuple(round(v, 3) for v in b.as_tuple())) for b in parse_location_text(text, size)]


def test_grounding_text_becomes_boxes_scaled_to_the_image():
    text = "</s><s>t-shirt<loc_100><loc_200><loc_300><loc_400></s>"
    # Bin centres: x = (b + 0.5) * 1000 / 1000, y = (b + 0.5) * 500 / 1000.
    assert _boxes(text) == [("t-shirt", (100.5, 100.25, 300.5, 200.25))]
    assert dequantize(999, 640) == pytest.approx(639.68)


def test_several_phrases_and_several_boxes_per_phrase():
    text = "<s>sneakers<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8> blue jeans<loc_10><loc_20><loc_30><loc_40></s>"
    got = _boxes(text, (1000, 1000))
    assert [label for label, _ in got] == ["sneakers", "sneakers", "blue jeans"]
    assert got[1][1] == (5.5, 6.5, 7.5, 8.5)


def test_odd_number_of_loc_tokens_keeps_whole_boxes_only():
    assert _boxes("hat<loc_1><loc_2><loc_3>", (1000, 1000)) == []
    got = _boxes("hat<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6>", (1000, 1000))
    assert got == [("hat", (1.5, 2.5, 3.5, 4.5))]


def test_out_of_range_bins_drop_only_their_box():
    got = _boxes("a<loc_1000><loc_2><loc_3><loc_4>b<loc_10><loc_20><loc_30><loc_40>", (1000, 1000))
    assert got == [("b", (10.5, 20.5, 30.5, 40.5))]
    assert _boxes("a<loc_99999999999999999999><loc_2><loc_3><loc_4>") == []


def test_missing_phrase_keeps_the_box_with_an_empty_label():
    assert _boxes("<s><loc_10><loc_20><loc_30><loc_40></s>", (1000, 1000)) == [("", (10.5, 20.5, 30.5, 40.5))]


def test_reversed_corners_are_reordered_and_degenerate_boxes_dropped():
    assert _boxes("x<loc_30><loc_40><loc_10><loc_20>", (1000, 1000)) == [("x", (10.5, 20.5, 30.5, 40.5))]
    assert _boxes("flat<loc_10><loc_20><loc_10><loc_40>", (1000, 1000)) == []


def test_tags_and_garbage_never_raise_and_never_enter_labels():
    assert _boxes("<od>red  dress<obj><loc_1><loc_2><loc_3><loc_4></od>", (1000, 1000)) == [
        ("red dress", (1.5, 2.5, 3.5, 4.5))
    ]
    for junk in (
        "",
        "<",
        "<loc_>",
        "<loc_12",
        "loc_1 loc_2 loc_3 loc_4",
        "<<<>>>",
        "<loc_-1><loc_2><loc_3><loc_4>",
    ):
        assert parse_location_text(junk, (10, 10)) == []
    with pytest.raises(ValueError):
        parse_location_text("x<loc_1><loc_2><loc_3><loc_4>", (0, 10))
    assert parse_location_text("x<loc_1><loc_2><loc_3><loc_4>", (10, 10))[0] == Box(
        "x", 0.015, 0.025, 0.035, 0.045
    )


# ------------------------------------------------------------------ the exported versions --


@pytest.fixture(scope="module")
def repo():
    pytest.importorskip("transformers")
    return tiny_vision_repo()


def test_every_part_passed_parity_at_export(repo):
    sam = json.loads((repo / "sam2_mask/1/sam2.json").read_text())
    flo = json.loads((repo / "florence2_ground/1/florence2.json").read_text())
    parity = {**sam["parity"], **flo["parity"]}
    assert set(parity) == {
        "sam2 image_encoder",
        "sam2 mask_decoder",
        "florence2 vision_encoder",
        "florence2 encoder",
        "florence2 decoder_init",
        "florence2 decoder_step",
    }
    for part, result in parity.items():
        assert result["min_cosine"] >= 0.9999, part
        assert result["max_abs_diff"] < 1e-3, part
    assert flo["pipeline_parity"]["tokens_equal"] is True
    assert not list(repo.glob("*/.*.tmp")), "staging folders left behind"


def test_sam2_onnx_matches_pytorch_at_a_new_batch_and_box_count(repo):
    import torch

    from export.sam2 import EMBEDDINGS, Sam2Request, build_model, wrappers
    from export.vision_common import session

    model, _ = build_model(Sam2Request(version=1, tiny=True))
    encoder, decoder = wrappers(model)
    rng = np.random.default_rng(7)
    pixels = rng.standard_normal((2, 3, 256, 256), dtype=np.float32)
    boxes = np.array([[[10, 20, 120, 200], [50, 50, 90, 90]]] * 2, dtype=np.float32)
    with torch.no_grad():
        feats = encoder(torch.from_numpy(pixels))
        ref_masks, ref_iou = decoder(*feats, torch.from_numpy(boxes))
    got = session(repo / "sam2_mask/1/image_encoder.onnx").run(list(EMBEDDINGS), {"pixel_values": pixels})
    for r, g in zip(feats, got):
        np.testing.assert_allclose(g, r.numpy(), atol=1e-4)
    masks, iou = session(repo / "sam2_mask/1/mask_decoder.onnx").run(
        None, {**dict(zip(EMBEDDINGS, got)), "input_boxes": boxes}
    )
    assert masks.shape == (2, 2, 64, 64) and iou.shape == (2, 2)
    np.testing.assert_allclose(masks, ref_masks.numpy(), atol=1e-4)
    np.testing.assert_allclose(iou, ref_iou.numpy(), atol=1e-5)


def test_sam2_serving_masks_match_transformers_postprocessing(repo):
    """Box scaling and mask upsampling (numpy) against Sam2Model + Sam2ImageProcessor."""
    import torch
    from transformers import Sam2ImageProcessor

    from export.sam2 import Sam2Request, build_model
    from export.triton_vision.image_ops import square_pixels
    from export.triton_vision.onnx_parts import InProcessParts
    from export.triton_vision.sam2_runtime import Sam2Masker, Sam2Spec

    meta = json.loads((repo / "sam2_mask/1/sam2.json").read_text())
    masker = Sam2Masker(Sam2Spec.from_json(meta), InProcessParts(str(repo / "sam2_mask/1"), meta["parts"], 1))
    model, _ = build_model(Sam2Request(version=1, tiny=True))
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8))  # w 200, h 300
    boxes = np.array([[20, 30, 150, 280], [0, 0, 60, 60]], dtype=np.float32)
    emb = masker.embed([image])
    masks, iou = masker.masks(emb, 0, boxes, image.size)
    assert masks.shape == (2, 300, 200) and masks.dtype == np.uint8 and iou.shape == (2,)

    pixels = torch.from_numpy(square_pixels(image, masker.spec.image)[None])
    scaled = boxes * np.array([256 / 200, 256 / 300] * 2, dtype=np.float32)
    with torch.no_grad():
        out = model(pixel_values=pixels, input_boxes=torch.from_numpy(scaled[None]), multimask_output=False)
    ref = Sam2ImageProcessor().post_process_masks(out.pred_masks, [(300, 200)])[0][:, 0].numpy()
    assert (ref == masks.astype(bool)).mean() > 0.999
    np.testing.assert_allclose(iou, out.iou_scores[0, :, 0].numpy(), atol=1e-4)


def test_bilinear_upsampling_matches_torch_interpolate():
    torch = pytest.importorskip("torch")

    x = np.random.default_rng(0).standard_normal((3, 16, 12)).astype(np.float32)
    for h, w in ((40, 30), (16, 12), (7, 50)):
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x)[None], (h, w), mode="bilinear", align_corners=False
        )
        np.testing.assert_allclose(resize_bilinear(x, h, w), ref[0].numpy(), atol=1e-5)


def test_florence2_decoder_with_past_matches_pytorch_at_a_longer_past(repo):
    import torch

    from export.florence2 import Florence2Request, build_model, kv_names, wrappers
    from export.vision_common import session

    model, processor = build_model(Florence2Request(version=1, tiny=True))
    mods = wrappers(model)
    rng = np.random.default_rng(11)
    layers = model.config.text_config.decoder_layers
    enc = torch.from_numpy(rng.standard_normal((2, 30, 64), dtype=np.float32))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 20:] = 0
    past = []
    for _ in range(layers):
        past += [
            torch.from_numpy(rng.standard_normal((2, 2, n, 32), dtype=np.float32)) for n in (6, 6, 30, 30)
        ]
    tokens = torch.tensor([[9], [300]])
    with torch.no_grad():
        ref = mods["decoder_step"](tokens, mask, enc, *past)
    sess = session(repo / "florence2_ground/1/decoder_step.onnx")
    feeds = {
        "input_ids": tokens.numpy(),
        "encoder_attention_mask": mask.numpy(),
        "encoder_hidden_states": enc.numpy(),
    }
    feeds.update({n: t.numpy() for n, t in zip(kv_names("past", layers), past)})
    got = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    assert got[1].shape == (2, 2, 7, 32)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r.numpy(), atol=1e-4)


def test_serving_tokenizer_matches_transformers_on_the_shipped_files(repo):
    from transformers import Florence2Processor

    processor = Florence2Processor.from_pretrained(str(repo / "florence2_ground/1/processor"))
    tok = BartTokenizer(str(repo / "florence2_ground/1/processor/tokenizer.json"))
    for text in (
        "Locate the phrases in the caption: a red t-shirt",
        "  two  spaces and ünïcödé — dashes, 'quotes' and digits 1234",
        "<s>boots<loc_1><loc_999></s><pad>",
        "",
    ):
        ids = processor.tokenizer.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == processor.tokenizer.decode(ids, skip_special_tokens=False)


def test_serving_tokenizer_applies_bpe_merges_like_tokenizers(tmp_path):
    """A real checkpoint's tokenizer has merges; train a small one and compare."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        "a red t-shirt with white stripes",
        "blue denim jeans",
        "black leather boots",
        "the shirt's collar",
    ] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    bpe.add_tokens(["<loc_0>", "<loc_1>"])
    bpe.save(str(tmp_path / "tokenizer.json"))
    ours = BartTokenizer(str(tmp_path / "tokenizer.json"))
    assert len(bpe.get_vocab()) > 256 + 4 + 2, "it learned merges beyond the byte alphabet"
    for text in ("a red shirt<loc_1> with stripes", "The SHIRT's boots, 42 of them!", "jeans\n\nnew  line"):
        assert ours.encode(text) == bpe.encode(text).ids, text
        assert ours.decode(bpe.encode(text).ids) == bpe.decode(
            bpe.encode(text).ids, skip_special_tokens=False
        )


def test_existing_version_is_never_overwritten(repo):
    from export.sam2 import Sam2Request, export_sam2

    before = (repo / "sam2_mask/1/image_encoder.onnx").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="already exists"):
        export_sam2(Sam2Request(version=1, tiny=True, repository=repo))
    assert (repo / "sam2_mask/1/image_encoder.onnx").stat().st_mtime_ns == before


def _parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_configs_parse_and_keep_the_contract_on_both_targets(repo, target):
    from export.vision_configs import (
        VisionPlan,
        florence2_ground_config,
        onnx_io,
        part_config,
        sam2_mask_config,
    )

    plan = VisionPlan(target=target)
    assert plan.effective_runner == ("bls" if target == "gpu" else "inprocess")
    ground, mask = _parse(florence2_ground_config(plan)), _parse(sam2_mask_config(plan))
    assert [(i.name, i.optional) for i in ground.input] == [
        ("image", False),
        ("phrase", False),
        ("task", True),
    ]
    assert [(o.name, list(o.dims)) for o in ground.output] == [
        ("boxes", [-1, 4]),
        ("labels", [-1]),
        ("text", [1]),
    ]
    assert [o.name for o in mask.output] == ["masks", "iou_scores"]
    for cfg in (ground, mask):
        assert cfg.backend == "python" and cfg.max_batch_size == 8
        assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
        assert cfg.parameters["runner"].string_value == plan.effective_runner
    for path in (repo / "florence2_ground/1/decoder_step.onnx", repo / "sam2_mask/1/mask_decoder.onnx"):
        inputs, outputs = onnx_io(path)
        part = _parse(part_config(plan, "x", inputs, outputs))
        assert part.backend == ("onnxruntime" if target == "gpu" else "python")
        assert part.max_batch_size == 0 and all(-1 in list(i.dims) for i in part.input)
    if target == "cpu":  # what the export wrote is this config, with its thread count
        written = (repo / "florence2_ground/config.pbtxt").read_text()
        assert written == florence2_ground_config(VisionPlan(target="cpu", onnx_threads=1))


def test_cli_has_the_two_subcommands(tmp_path, capsys):
    from export.__main__ import main

    for command in ("sam2", "florence2"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for flag in ("--checkpoint", "--random-init", "--tiny", "--version", "--target", "--repository"):
            assert flag in out, (command, flag)


def test_grounding_a_look_for_several_phrases_encodes_it_once_with_the_same_answers(repo):
    from export.triton_vision.florence2_runtime import Florence2Grounder, Florence2Spec
    from export.triton_vision.onnx_parts import InProcessParts

    version = repo / "florence2_ground/1"
    meta = json.loads((version / "florence2.json").read_text())
    parts = InProcessParts(str(version), meta["parts"], 1)
    seen = []

    def run(part, feeds, outputs):
        seen.append((part, len(next(iter(feeds.values())))))
        return parts(part, feeds, outputs)

    grounder = Florence2Grounder(
        Florence2Spec.from_json(meta), BartTokenizer(str(version / meta["tokenizer"])), run
    )
    rng = np.random.default_rng(5)
    look = Image.fromarray(rng.integers(0, 255, (90, 60, 3), dtype=np.uint8))
    other = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    phrases = ["t-shirt", "a pair of wide blue jeans", "boots"]
    together = grounder.ground([look, other, look], ["<CAPTION_TO_PHRASE_GROUNDING>"] * 3, phrases)
    assert ("vision_encoder", 2) in seen  # two distinct images for three rows
    for img, phrase, result in zip([look, other, look], phrases, together):
        (alone,) = grounder.ground([img], ["<CAPTION_TO_PHRASE_GROUNDING>"], [phrase])
        assert result.text == alone.text and result.labels == alone.labels
        np.testing.assert_allclose(result.boxes, alone.boxes, atol=1e-4)
        assert ((result.boxes >= 0) & (result.boxes <= [img.width, img.height] * 2)).all()


def test_checkpoint_directories_export_through_the_cli_with_their_own_processor(tmp_path):
    """`--checkpoint DIR`: a local Hugging Face folder (here: the tiny models saved to disk)."""
    pytest.importorskip("transformers")
    from transformers import Sam2ImageProcessor

    from export.__main__ import main
    from export.florence2 import Florence2Request
    from export.florence2 import build_model as build_florence2
    from export.sam2 import Sam2Request
    from export.sam2 import build_model as build_sam2

    sam, _ = build_sam2(Sam2Request(version=1, tiny=True, seed=3))
    sam.save_pretrained(tmp_path / "sam2-ckpt")
    Sam2ImageProcessor(size={"height": 256, "width": 256}).save_pretrained(tmp_path / "sam2-ckpt")
    florence, processor = build_florence2(Florence2Request(version=1, tiny=True, imprint=False, seed=3))
    florence.save_pretrained(tmp_path / "florence2-ckpt")
    processor.save_pretrained(tmp_path / "florence2-ckpt")

    repo = tmp_path / "repo"
    for name in ("sam2", "florence2"):
        main(
            [
                name,
                "--checkpoint",
                str(tmp_path / f"{name}-ckpt"),
                "--version",
                "3",
                "--repository",
                str(repo),
            ]
        )
    sam_meta = json.loads((repo / "sam2_mask/3/sam2.json").read_text())
    assert sam_meta["weights"].endswith("sam2-ckpt") and sam_meta["image"]["height"] == 256
    flo_meta = json.loads((repo / "florence2_ground/3/florence2.json").read_text())
    assert flo_meta["weights"].endswith("florence2-ckpt") and flo_meta["imprinted"] is False
    assert flo_meta["pipeline_parity"]["tokens_equal"] is True
    assert (repo / "florence2_ground/3/processor/tokenizer.json").is_file()
    with pytest.raises(SystemExit):  # --tiny is a random-init config, never a checkpoint's
        main(["sam2", "--checkpoint", str(tmp_path / "sam2-ckpt"), "--tiny", "--version", "4"])


def test_real_sizes_build_with_their_published_shapes():
    """`--size` builds the real architectures with random weights (what a model team exports
    before its checkpoints arrive); an unknown size is refused by name."""
    from export.florence2 import Florence2Request
    from export.florence2 import build_model as florence2_model
    from export.sam2 import Sam2Request
    from export.sam2 import build_model as sam2_model

    model, spec = sam2_model(Sam2Request(version=1, size="base-plus"))
    # sam2.1-hiera-base-plus is 80.8 M with the video memory modules, which Sam2Model leaves out.
    assert 72e6 < sum(p.numel() for p in model.parameters()) < 75e6
    assert model.config.vision_config.backbone_config.embed_dim_per_stage == [112, 224, 448, 896]
    assert spec["height"] == spec["width"] == 1024
    with pytest.raises(SystemExit, match="huge"):
        sam2_model(Sam2Request(version=1, size="huge"))
    with pytest.raises(SystemExit, match="tiny, base, large"):
        florence2_model(Florence2Request(version=1, size="xl"))
