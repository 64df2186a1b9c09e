"""Florence-2 grounding over the exported ONNX parts: prompts, batched greedy decoding, boxes.

Parts (names are the `run` callable's `part` argument; see onnx_parts.py):

    vision_encoder  pixel_values (B,3,S,S)                          -> image_features (B,T,D)
    encoder         input_ids (B,L), attention_mask (B,L), image_features -> encoder_hidden_states (B,L,D)
    decoder_init    decoder_input_ids (B,1), encoder_hidden_states, encoder_attention_mask
                    -> logits (B,1,V), present.{i}.self|cross.key|value
    decoder_step    input_ids (B,1), encoder_attention_mask, encoder_hidden_states,
                    past.{i}.self|cross.key|value -> logits (B,1,V), present.{i}.self.key|value

Decoding is greedy with a KV cache, the same as `model.generate(do_sample=False, num_beams=1)`
with the model's forced BOS/EOS rules (the export checks token-for-token equality). Rows of a
batch stop independently; finished rows are fed the pad token until the whole batch is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

if __package__:
    from . import florence2_post as post
    from .bart_tokenizer import BartTokenizer
    from .image_ops import SquareSpec, square_pixels
else:
    import florence2_post as post
    from bart_tokenizer import BartTokenizer
    from image_ops import SquareSpec, square_pixels

GROUNDING = "<CAPTION_TO_PHRASE_GROUNDING>"
OBJECT_DETECTION = "<OD>"
# The prompts Florence2Processor substitutes for the task tokens (the model was trained on them).
TASK_PROMPTS = {
    OBJECT_DETECTION: "Locate the objects with category name in the image.",
    GROUNDING: "Locate the phrases in the caption: {input}",
}


class InvalidRequest(ValueError):
    """The request cannot be served (unknown task, missing or over-long phrase)."""


@dataclass(frozen=True)
class Florence2Spec:
    image: SquareSpec
    image_seq_length: int
    decoder_layers: int
    max_source_positions: int
    decoder_start_token_id: int
    eos_token_id: int
    pad_token_id: int
    forced_bos_token_id: int | None
    forced_eos_token_id: int | None
    max_new_tokens: int = 128

    @classmethod
    def from_json(cls, meta: dict) -> Florence2Spec:
        gen = meta["generation"]
        return cls(
            image=SquareSpec.from_json(meta["image"]),
            image_seq_length=int(meta["image_seq_length"]),
            decoder_layers=int(meta["decoder_layers"]),
            max_source_positions=int(meta["max_source_positions"]),
            decoder_start_token_id=int(gen["decoder_start_token_id"]),
            eos_token_id=int(gen["eos_token_id"]),
            pad_token_id=int(gen["pad_token_id"]),
            forced_bos_token_id=gen.get("forced_bos_token_id"),
            forced_eos_token_id=gen.get("forced_eos_token_id"),
            max_new_tokens=int(gen.get("max_new_tokens", 128)),
        )


def build_prompt(task: str, phrase: str = "") -> str:
    if task not in TASK_PROMPTS:
        raise InvalidRequest(f"task must be one of {sorted(TASK_PROMPTS)}, got {task!r}")
    if task == GROUNDING:
        phrase = " ".join(phrase.split())
        if not phrase:
            raise InvalidRequest("phrase is empty: grounding needs the phrase to find")
        return TASK_PROMPTS[task].format(input=phrase)
    return TASK_PROMPTS[task]


@dataclass
class Grounding:
    text: str
    boxes: np.ndarray  # (N, 4) float32, pixels of the input image
    labels: list[str]


class Florence2Grounder:
    def __init__(self, spec: Florence2Spec, tokenizer: BartTokenizer, run):
        self.spec = spec
        self.tok = tokenizer
        self.run = run
        self.image_id = tokenizer.token_id("<image>")
        self.bos_id = tokenizer.token_id("<s>")
        self.eos_id = tokenizer.token_id("</s>")

    def prompt_ids(self, task: str, phrase: str = "") -> list[int]:
        ids = [self.image_id] * self.spec.image_seq_length + [self.bos_id]
        ids += self.tok.encode(build_prompt(task, phrase)) + [self.eos_id]
        if len(ids) > self.spec.max_source_positions:
            room = self.spec.max_source_positions - self.spec.image_seq_length - 2
            raise InvalidRequest(f"phrase is too long: the prompt may have at most {room} tokens")
        return ids

    def _pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        longest = max(len(r) for r in rows)
        ids = np.full((len(rows), longest), self.spec.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask

    def generate(
        self,
        pixel_values: np.ndarray,
        prompt_rows: list[list[int]],
        max_new_tokens: int | None = None,
        image_index: list[int] | None = None,
    ):
        """Greedy decoding; returns the generated ids per row (decoder start token first).

        `image_index[row]` picks the row's image among `pixel_values` (default: row i, image i),
        so several phrases about one look share one vision-encoder pass.
        """
        spec = self.spec
        limit = int(max_new_tokens or spec.max_new_tokens)
        run = self.run
        feats = run("vision_encoder", {"pixel_values": pixel_values}, ["image_features"])["image_features"]
        if image_index is not None:
            feats = np.ascontiguousarray(feats[np.asarray(image_index, dtype=np.int64)])
        ids, mask = self._pad(prompt_rows)
        enc = run(
            "encoder",
            {"input_ids": ids, "attention_mask": mask, "image_features": feats},
            ["encoder_hidden_states"],
        )["encoder_hidden_states"]
        batch = len(prompt_rows)
        layers = range(spec.decoder_layers)
        start = np.full((batch, 1), spec.decoder_start_token_id, dtype=np.int64)
        init_out = ["logits"] + [
            f"present.{i}.{a}.{kv}" for i in layers for a in ("self", "cross") for kv in ("key", "value")
        ]
        out = run(
            "decoder_init",
            {"decoder_input_ids": start, "encoder_hidden_states": enc, "encoder_attention_mask": mask},
            init_out,
        )
        cross = {
            f"past.{i}.cross.{kv}": out[f"present.{i}.cross.{kv}"] for i in layers for kv in ("key", "value")
        }
        self_kv = {
            f"past.{i}.self.{kv}": out[f"present.{i}.self.{kv}"] for i in layers for kv in ("key", "value")
        }
        step_out = ["logits"] + [f"present.{i}.self.{kv}" for i in layers for kv in ("key", "value")]
        sequences = [[spec.decoder_start_token_id] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        logits = out["logits"]
        for step in range(limit):
            scores = logits[:, -1, :]
            if step == 0 and spec.forced_bos_token_id is not None:
                nxt = np.full(batch, spec.forced_bos_token_id, dtype=np.int64)
            elif step == limit - 1 and spec.forced_eos_token_id is not None:
                nxt = np.full(batch, spec.forced_eos_token_id, dtype=np.int64)
            else:
                nxt = scores.argmax(axis=-1).astype(np.int64)
            nxt = np.where(done, spec.pad_token_id, nxt)
            for i in range(batch):
                if not done[i]:
                    sequences[i].append(int(nxt[i]))
            done |= nxt == spec.eos_token_id
            if done.all() or step == limit - 1:
                break
            feeds = {
                "input_ids": nxt.reshape(batch, 1),
                "encoder_attention_mask": mask,
                "encoder_hidden_states": enc,
                **self_kv,
                **cross,
            }
            out = run("decoder_step", feeds, step_out)
            logits = out["logits"]
            self_kv = {
                f"past.{i}.self.{kv}": out[f"present.{i}.self.{kv}"]
                for i in layers
                for kv in ("key", "value")
            }
        return sequences

    def ground(
        self, images, tasks: list[str], phrases: list[str], max_new_tokens: int | None = None
    ) -> list[Grounding]:
        """One grounding per (PIL image, task, phrase); boxes in the image's own pixels.

        The same image object given for several rows is encoded once.
        """
        rows = [self.prompt_ids(t, p) for t, p in zip(tasks, phrases)]
        slots: dict[int, int] = {}
        unique = []
        for img in images:
            if id(img) not in slots:
                slots[id(img)] = len(unique)
                unique.append(img)
        pixels = np.stack([square_pixels(img, self.spec.image) for img in unique])
        index = [slots[id(img)] for img in images]
        sequences = self.generate(pixels, rows, max_new_tokens, None if len(unique) == len(images) else index)
        results = []
        for img, seq in zip(images, sequences):
            text = self.tok.decode(seq[1:])  # the decoder start token is not output
            boxes = post.parse_location_text(text, img.size)
            arr, labels = post.boxes_to_arrays(boxes)
            results.append(Grounding(text, arr, labels))
        return results
