"""Florence-2's tokenizer (BART's byte-level BPE plus task and location tokens): the version's
`tokenizer.json`, run by Hugging Face `tokenizers`.

A thin adapter: the grounding loop needs ids of a prompt without special tokens around it, ids
of a few named tokens, and the text of generated ids with the added tokens (`<loc_12>`, `</s>`)
kept literally, which is what the post-processor parses. Export checks prompt ids and the whole
generation loop against transformers and refuses to write a version that differs.
"""

from __future__ import annotations

from tokenizers import Tokenizer


class BartTokenizer:
    def __init__(self, tokenizer_json_path: str):
        self.tokenizer = Tokenizer.from_file(tokenizer_json_path)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def token_id(self, token: str) -> int:
        found = self.tokenizer.token_to_id(token)
        if found is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return found

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added around it."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids`; added tokens appear literally unless skipped."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)
