"""Three embedding-model families (CLIP, SigLIP-style, DINOv2) exported with their own
pre-processing and tokenizers, served side by side by one real Triton and one gateway, each
space with its own index; requests name the space they search."""

import io
import json
import shutil

import grpc
import numpy as np
import pytest
from PIL import Image

from benchmarks.quality import Queries, compare_spaces
from clients.world import write_world
from export.clip import ExportRequest, export_clip
from export.triton.preprocess import ImageSpec, pixels
from export.triton.text_tokenizer import TextTokenizer
from tests.conftest import looksync, looksync_env, start_gateway, start_triton

TINY = {"siglip": "looksync-siglip-tiny", "dinov2": "looksync-dinov2-tiny"}


@pytest.fixture(scope="module")
def families_repo(tiny_repo, tmp_path_factory):
    repo = tmp_path_factory.mktemp("families_repo")
    shutil.copytree(tiny_repo, repo, dirs_exist_ok=True)  # clip v1
    for family, arch in TINY.items():
        # export_clip refuses (SystemExit) when ONNX differs from PyTorch or the serving
        # tokenizer from the reference one: reaching the next line is the parity check.
        export_clip(ExportRequest(family=family, arch=arch, name=family, version=1, repository=repo))
    return repo


@pytest.fixture(scope="module")
def served(families_repo, tmp_path_factory):
    """Triton with all three; the world indexed into each space (clip first: the alias)."""
    work = tmp_path_factory.mktemp("families")
    world = work / "world"
    write_world(world, products=60, looks=4, seed=3)
    server = start_triton(families_repo, work / "triton")
    env = looksync_env(server, work / "data")
    gw = None
    try:
        for model in ("clip", "siglip", "dinov2"):
            done = looksync("index", str(world / "catalog.jsonl"), "--quiet", "--model", model, env=env)
            assert done.returncode == 0, done.stderr
        gw = start_gateway(env, work / "gateway.log")
        with gw.client() as client:
            yield client, world, gw.address
    finally:
        if gw is not None:
            gw.stop()
        server.stop()


def _meta(repo, name):
    return json.loads((repo / name / "1" / "preprocess.json").read_text())


def test_each_family_records_its_own_preprocessing(families_repo):
    siglip, dino = _meta(families_repo, "siglip_image"), _meta(families_repo, "dinov2_image")
    assert (siglip["family"], siglip["resize_mode"], siglip["mean"]) == ("siglip", "squash", [0.5] * 3)
    assert (dino["family"], dino["modalities"], dino["crop_rounding"]) == ("dinov2", ["image"], "floor")
    assert (dino["image_size"], dino["resize_size"]) == (56, 64)
    text = _meta(families_repo, "siglip_text")
    assert (text["tokenizer"], text["context_length"], text["trim_padding"]) == ("tokenizers", 64, False)
    assert not (families_repo / "dinov2_text").exists()
    assert 'string_value: "dinov2"' in (families_repo / "dinov2_image" / "config.pbtxt").read_text()


def _odd_image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("size", [(83, 61), (61, 97), (64, 64), (200, 131)])
def test_preprocessing_equals_each_familys_reference(families_repo, size):
    """SigLIP: open_clip's own transform for the SigLIP config; DINOv2: the Hugging Face
    processor (shortest side, crop offset floored). Odd sizes make the rounding show."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from transformers import BitImageProcessor

    img = _odd_image(*size, seed=sum(size))
    siglip = _meta(families_repo, "siglip_image")
    cfg = PreprocessCfg(
        size=siglip["image_size"], mean=tuple(siglip["mean"]), std=tuple(siglip["std"]),
        interpolation="bicubic", resize_mode="squash",
    )  # fmt: skip
    want = image_transform_v2(cfg, is_train=False)(img).numpy()
    np.testing.assert_allclose(pixels(img, ImageSpec.from_meta(siglip)), want, atol=1e-5)

    dino = _meta(families_repo, "dinov2_image")
    processor = BitImageProcessor(
        size={"shortest_edge": dino["resize_size"]},
        crop_size={"height": dino["image_size"], "width": dino["image_size"]},
        image_mean=dino["mean"], image_std=dino["std"], do_convert_rgb=True,
    )  # fmt: skip
    want = processor(images=img, return_tensors="np")["pixel_values"][0]
    got = pixels(img, ImageSpec.from_meta(dino))
    # transformers 5 resizes with torch's antialiased bicubic, we (like DINOv2's own
    # torchvision-on-PIL training transform) with Pillow's: a few pixels differ by one
    # intensity level. A wrong crop offset or mean/std would differ by far more.
    one_level = 1.01 / 255 / min(dino["std"])
    np.testing.assert_allclose(got, want, atol=one_level)
    assert np.mean(np.abs(got - want) > 1e-5) < 0.05


def _png(path) -> bytes:
    return path.read_bytes()


def test_spaces_answer_with_their_own_identity(served):
    client, world, _ = served
    record = json.loads((world / "catalog.jsonl").read_text().splitlines()[11])
    image = _png(world / record["image_url"])
    for model, family, modalities in (
        ("clip", "clip", ["image", "text"]),
        ("siglip", "siglip", ["image", "text"]),
        ("dinov2", "dinov2", ["image"]),
    ):
        resp = client.search_image(image, k=3, space=(model, 1))
        assert (resp.space.model, resp.space.family, list(resp.space.modalities)) == (
            model,
            family,
            modalities,
        )
        # A product's own image finds it first only when the query was embedded by the same
        # model (and the same pre-processing) as that space's index.
        assert resp.hits[0].product.id == record["id"], model
    default = client.search_image(image, k=1)
    assert default.space.model == "clip"
    text = client.search_text("red striped shirt", k=3, space=("siglip", 1))
    assert text.space.family == "siglip" and len(text.hits) == 3


def test_text_against_an_image_only_space_is_failed_precondition(served):
    client, world, _ = served
    with pytest.raises(grpc.RpcError) as caught:
        client.search_text("red striped shirt", k=3, space=("dinov2", 1))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "image-only" in caught.value.details() and "dinov2" in caught.value.details()
    buf = io.BytesIO()
    Image.new("RGB", (40, 60), (200, 30, 30)).save(buf, "PNG")
    with pytest.raises(grpc.RpcError) as caught:
        client.search_image(buf.getvalue(), k=3, text_modifier="in blue", space=("dinov2", 1))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert client.search_image(buf.getvalue(), k=3, space=("dinov2", 1)).hits


def test_look_search_in_an_image_only_space_uses_region_queries(served):
    client, world, _ = served
    look = json.loads((world / "looks.json").read_text())["looks"][0]
    resp = client.search_look(_png(world / look["image"]), k_per_layer=3, space=("dinov2", 1))
    assert resp.space.family == "dinov2"
    assert resp.layers and all(layer.query_source == "fallback" for layer in resp.layers)
    assert any(layer.hits for layer in resp.layers)


def test_harness_compares_two_spaces(served):
    client, world, address = served
    table, breakdown, figures = compare_spaces(address, Queries(world, 12), [("clip", 1), ("dinov2", 1)])
    rows = [r for r in table.splitlines() if r.startswith("| ") and "task" not in r]
    assert {r.split(" | ")[1] for r in rows} == {"clip v1", "dinov2 v1"}
    text_dino = next(r for r in rows if r.startswith("| text") and "dinov2" in r)
    assert "n/a" in text_dino
    # Exact image queries find their own product first in both spaces.
    assert figures["image_clip_v1_r5"] == 1.0 and figures["image_dinov2_v1_r5"] == 1.0
    assert "category" in breakdown and "gender" in breakdown and "dinov2 v1" in breakdown


def test_serving_tokenizer_equals_open_clips_hf_tokenizer_on_a_unigram_model():
    from open_clip.tokenizer import HFTokenizer

    from export.families import TOKENIZERS

    folder = TOKENIZERS / "looksync-unigram"
    reference = HFTokenizer(str(folder), context_length=16, clean="canonicalize")
    ours = TextTokenizer(str(folder / "tokenizer.json"), 16, reference.tokenizer.pad_token_id, "canonicalize")
    texts = [
        "red striped shirt", "Red-Striped SHIRT!", "", "  \t ", "zqxj unknown wörds", "日本語 👗",
        "café crème", "ﬁ ligature ①", "one two three four five six seven eight nine ten eleven twelve",
        "a_b_c", "x" * 40,
    ]  # fmt: skip
    ids, truncated = ours(texts)
    np.testing.assert_array_equal(ids, reference(texts).numpy())
    full = [len(reference.tokenizer(reference.clean_fn(t))["input_ids"]) for t in texts]
    assert truncated.tolist() == [n > 16 for n in full] and any(truncated) and not all(truncated)
    assert (ids[:, -1] == reference.tokenizer.pad_token_id).sum() >= 8  # right padding kept


def _t5_style_tokenizer(folder):
    """A tokenizer shaped like the ones T5 and SigLIP checkpoints ship: a SentencePiece Unigram
    model trained with the nmt_nfkc rule, converted to tokenizer.json with its precompiled
    charsmap normaliser, Metaspace and `</s>` appended."""
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import sentencepiece_model_pb2_new as sp_pb

    from clients.world import make_catalog

    texts = [p.style.caption for p in make_catalog(300, seed=1)]
    texts += [
        "Ｆｕｌｌｗｉｄｔｈ ＴＥＸＴ",
        "café crème brûlée",
        "ﬁne ① ² ㎏",
        "Ångström Ωhm",
        "naïve façade",
    ]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=200, hard_vocab_limit=False,
        model_type="unigram", normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, minloglevel=2,
    )  # fmt: skip
    proto = sp_pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    tok = Tokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=2))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))
    return folder


def test_t5_style_checkpoint_tokenizer_serves_as_open_clip_tokenizes(tmp_path):
    """A tokenizer.json shaped like real SigLIP/T5 ones (precompiled charsmap normaliser), served
    id for id as open_clip's HFTokenizer gives them, cleaning, truncation and padding included:
    fullwidth forms, ligatures, compatibility characters, combining marks (graphemes), emoji with
    joiners and skin tones, Hangul, RTL, control and odd spaces."""
    from open_clip.tokenizer import HFTokenizer

    folder = _t5_style_tokenizer(tmp_path / "t5style")
    reference = HFTokenizer(str(folder), context_length=24, clean="whitespace")
    ours = TextTokenizer(str(folder / "tokenizer.json"), 24, reference.tokenizer.pad_token_id, "whitespace")
    texts = [
        "Ｆｕｌｌｗｉｄｔｈ ＴＥＸＴ", "ﬁne ﬂoral ① ² ㎏ ℃ Ⅻ", "cafe\u0301 cre\u0300me", "e\u0301\u0302\u0303 stacked",
        "👩\u200d👩\u200d👧 family 👍🏽", "한국어 텍스트", "مرحبا بالعالم", "tab\there\u00a0nbsp\u2003em",
        "zero\u200bwidth", "ＡＢＣ１２３！？", "…‥ ‘quotes’ “double”", "Ⓐⓑ ㈱ ㍿", "", "a" * 60,
        "red striped shirt", "\u3000ideographic space", "&amp;quot;red&amp;quot; shirt", "cafÃ© mojibake",
        "a<unk>b", "</s>hello", "x </s> y", "<pad><pad>", "  leading and trailing  ",
    ]  # fmt: skip
    ids, _ = ours(texts)
    want = reference(texts).numpy()
    for text, a, b in zip(texts, ids, want):
        assert a.tolist() == b.tolist(), text

    # Pre-tokenizer variants found in the wild, each against the Rust library.
    spec = json.loads((folder / "tokenizer.json").read_text())
    metaspace = spec["pre_tokenizer"]
    variants = {
        "first": {**metaspace, "prepend_scheme": "first"},
        "never": {**metaspace, "prepend_scheme": "never"},
        "sequence": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]},
    }
    for name, pre in variants.items():
        variant = tmp_path / name
        shutil.copytree(folder, variant)
        (variant / "tokenizer.json").write_text(json.dumps({**spec, "pre_tokenizer": pre}))
        reference = HFTokenizer(str(variant), context_length=24, clean="whitespace")
        ours = TextTokenizer(
            str(variant / "tokenizer.json"), 24, reference.tokenizer.pad_token_id, "whitespace"
        )
        for text, a, b in zip(texts, ours(texts)[0], reference(texts).numpy()):
            assert a.tolist() == b.tolist(), (name, text)
    # And export's own gate accepts it for a SigLIP-style model (the ids must match there too).
    repo = tmp_path / "repo"
    export_clip(
        ExportRequest(family="siglip", arch=TINY["siglip"], name="siglip", version=1, repository=repo,
                      tokenizer=str(folder))
    )  # fmt: skip
    assert _meta(repo, "siglip_text")["tokenizer"] == "tokenizers"


def test_mos_tasks_show_two_spaces_blind(served, tmp_path):
    from benchmarks.mos.tasks import System, prepare, world_looks

    client, world, address = served
    systems = [System.parse(f"clip={address}/clip:1"), System.parse(f"dino={address}/dinov2:1")]
    tasks = prepare(world_looks(world, 2), systems, tmp_path / "tasks", world, k=3, progress=False)
    assert {(i["system"], i["space"]) for i in tasks["items"]} == {("clip", "clip v1"), ("dino", "dinov2 v1")}
    assert len(tasks["pairs"]) == 2 and all(len(p["items"]) == 2 for p in tasks["pairs"])
