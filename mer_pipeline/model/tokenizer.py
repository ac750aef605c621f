"""Text to token ids and back, from what the store's source carried.

Two sources, tried in order:

- a Hugging Face `tokenizer.json` beside the imported checkpoint, read with the optional
  `tokenizers` package;
- the vocabulary of a GGUF source (tokenizer.ggml.tokens and .scores, copied to
  dense.gguf), for SentencePiece ("llama") vocabularies: encoding merges the adjacent
  pair whose joined piece has the highest score until no pair is in the vocabulary, as
  llama.cpp's SPM tokenizer does, with byte pieces <0xNN> for characters the vocabulary lacks.
"""

from __future__ import annotations

from pathlib import Path

from mer_pipeline.model.config import ModelError
from mer_pipeline.store import Store

SPACE_PIECE = "\u2581"  # SentencePiece's word-boundary mark


class Tokenizer:
    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise ModelError(f"{path} needs the `tokenizers` package to read; install it or pass --prompt-ids") from None
        self.backend = Backend.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)


class SentencePieceVocab(Tokenizer):
    def __init__(self, pieces: list[str], scores: list[float], bos_token_id: int | None) -> None:
        self.pieces = pieces
        self.scores = scores
        self.bos_token_id = bos_token_id
        self.id_of = {piece: index for index, piece in enumerate(pieces)}

    def encode(self, text: str) -> list[int]:
        symbols = list(SPACE_PIECE + text.replace(" ", SPACE_PIECE))
        while True:
            best, best_score = None, float("-inf")
            for index in range(len(symbols) - 1):
                joined = symbols[index] + symbols[index + 1]
                token = self.id_of.get(joined)
                if token is not None and self.scores[token] > best_score:
                    best, best_score = index, self.scores[token]
            if best is None:
                break
            symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
        ids = [] if self.bos_token_id is None else [self.bos_token_id]
        for symbol in symbols:
            if symbol in self.id_of:
                ids.append(self.id_of[symbol])
                continue
            for byte in symbol.encode("utf-8"):
                piece = f"<0x{byte:02X}>"
                if piece not in self.id_of:
                    raise ModelError(f"character {symbol!r} is not in the vocabulary and it has no byte piece {piece}")
                ids.append(self.id_of[piece])
        return ids

    def decode(self, ids: list[int]) -> str:
        data = bytearray()
        for token in ids:
            piece = self.pieces[token]
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                data.append(int(piece[3:5], 16))
            else:
                data += piece.replace(SPACE_PIECE, " ").encode("utf-8")
        return data.decode("utf-8", errors="replace")


def _hf_tokenizer_path(store: Store) -> Path | None:
    source = store.source or {}
    if source.get("kind") != "safetensors" or not source.get("path"):
        return None
    path = Path(source["path"])
    folder = path if path.is_dir() else path.parent
    candidate = folder / "tokenizer.json"
    return candidate if candidate.is_file() else None


def load_tokenizer(store: Store) -> Tokenizer | None:
    """Return the store's tokenizer, or None when its source carried none."""
    path = _hf_tokenizer_path(store)
    if path is not None:
        return HFTokenizer(path)
    if store.dense_path is None:
        return None
    reader = store.open_dense()
    tokens = reader.get_field("tokenizer.ggml.tokens")
    model = reader.get_field("tokenizer.ggml.model")
    if tokens is None or model is None or model.contents() != "llama":
        return None
    pieces = tokens.contents()
    scores_field = reader.get_field("tokenizer.ggml.scores")
    scores = scores_field.contents() if scores_field is not None else [0.0] * len(pieces)
    bos = reader.get_field("tokenizer.ggml.bos_token_id")
    add_bos = reader.get_field("tokenizer.ggml.add_bos_token")
    use_bos = bos is not None and (add_bos is None or bool(add_bos.contents()))
    return SentencePieceVocab(pieces, scores, int(bos.contents()) if use_bos else None)
