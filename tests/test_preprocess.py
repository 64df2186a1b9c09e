"""Server-side pre-processing matches open_clip's (the training-time transform and tokenizer)."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.clip_tokenizer import write as write_clip_tokenizer
from export.triton.preprocess import ImageSpec, InvalidImage, decode_image, pixels, probe_image
from export.triton.text_tokenizer import TextTokenizer

open_clip = pytest.importorskip("open_clip")

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """What export writes into a CLIP text version, served as the Triton model serves it."""
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    path = write_clip_tokenizer(bpe, tmp_path_factory.mktemp("clip-tok") / "tokenizer.json")
    return TextTokenizer(str(path), 77, 0, "lower")


TEXTS = [
    "red midi dress",
    "A  Striped SHIRT's collar &amp; cuffs!",
    "Ünïcödé café 123 ½",
    "emoji 👗🔥 dress",
    "فستان أحمر طويل",
    "連衣裙 红色",
    "under_score hello-world 3/4 sleeves",
    "word " * 100,
    "",
    "<start_of_text> typed <END_OF_TEXT> specials",
    "don't it's WE'LL",
    "cafÃ© mojibake &amp;amp; tab\there\u00a0nbsp",
    "Ｆｕｌｌｗｉｄｔｈ ﬁ ① 👩\u200d👩\u200d👧 e\u0301",
    "word " * 75,
    "word " * 76,
]


def test_tokenizer_matches_open_clip(tokenizer):
    ref = open_clip.get_tokenizer("ViT-B-32")(TEXTS).numpy()
    ids, truncated = tokenizer(TEXTS)
    np.testing.assert_array_equal(ids, ref)
    full = [len(open_clip.tokenizer._tokenizer.encode(t)) + 2 for t in TEXTS]
    assert truncated.tolist() == [n > 77 for n in full]
    assert truncated.tolist() == [False] * 7 + [True] + [False] * 5 + [False, True]


def test_truncated_text_still_ends_with_end_of_text(tokenizer):
    ids, truncated = tokenizer(["pleated " * 200])
    sot, eot = tokenizer.token_id("<start_of_text>"), tokenizer.token_id("<end_of_text>")
    assert truncated[0] and ids[0, -1] == eot and ids[0, 0] == sot


def test_serving_tokenizer_needs_ftfy_and_never_falls_back(tmp_path):
    """Text left unrepaired tokenises differently from training: without ftfy the module fails
    to import (the Triton model then fails to load) instead of serving other ids."""
    import subprocess
    import sys

    code = "import sys; sys.modules['ftfy'] = None; import export.triton.text_tokenizer"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert run.returncode != 0 and "ftfy" in run.stderr


@pytest.mark.parametrize("size", [(64, 64), (100, 37), (37, 100), (321, 123), (30, 30)])
def test_image_preprocessing_matches_open_clip_transform(size):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    transform = open_clip.image_transform(64, is_train=False, mean=MEAN, std=STD)
    ref = transform(img).numpy()
    got = pixels(img, ImageSpec(64, MEAN, STD))
    assert got.shape == ref.shape == (3, 64, 64)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_transparent_cutouts_are_put_on_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgb = decode_image(_png(img))
    assert rgb.mode == "RGB" and rgb.getpixel((5, 5)) == (255, 255, 255)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"GIF89a" + b"\x00" * 3, "not a supported image"),
        (b"%PDF-1.4 definitely not an image", "not a supported image"),
        (_jpeg(Image.new("RGB", (200, 200), "red"))[:650], "truncated"),
        (_jpeg(Image.new("RGB", (200, 200), "red"))[:300], "not a supported image"),
    ],
)
def test_bad_images_are_refused_with_a_reason(data, message):
    with pytest.raises(InvalidImage, match=message):
        decode_image(data)


def test_decompression_bomb_is_refused_from_the_header():
    # A 20000x20000 PNG of one colour compresses to a few hundred KB; the header alone is enough.
    img = Image.new("1", (20000, 20000))
    data = _png(img)
    assert len(data) < 1_000_000
    with pytest.raises(InvalidImage, match="over the limit"):
        probe_image(data, max_pixels=40_000_000)
