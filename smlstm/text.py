"""The word vocabulary: built from train-split captions only, saved beside each checkpoint.

Ids: `<pad>` = 0 (padding, masked out by the model), `<unk>` = 1 (any word not in the
vocabulary), then words by descending train count, ties alphabetical, so the same captions
always give the same ids. `fingerprint` is a hash of the exact id -> word table: a checkpoint
records it and refuses a vocabulary that does not match.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from features.errors import InputError

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
_FORMAT = "smlstm-vocabulary"


class Vocabulary:
    """A fixed word <-> id table. Build with `Vocabulary.build`, persist with `save` / `load`."""

    def __init__(self, words: Sequence[str], min_count: int = 1):
        """`words` is the full id -> word table, starting with `<pad>`, `<unk>`."""
        if not all(isinstance(word, str) for word in words):
            raise TypeError("vocabulary words must be strings")
        if list(words[:2]) != [PAD, UNK]:
            raise ValueError(f"a vocabulary starts with {PAD!r}, {UNK!r}; got {list(words[:2])}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary cannot list a word twice")
        self.words: tuple[str, ...] = tuple(words)
        self.min_count = min_count
        self.index: dict[str, int] = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_count: int = 1) -> Vocabulary:
        """Count words over the given captions (pass the TRAIN split only) and keep those seen
        at least `min_count` times, ordered by descending count then alphabetically."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(token for tokens in token_lists for token in tokens)
        counts.pop(PAD, None)  # the specials keep their fixed ids whatever the text says
        counts.pop(UNK, None)
        kept = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls([PAD, UNK, *kept], min_count=min_count)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def __hash__(self) -> int:
        return hash(self.words)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words, min_count={self.min_count}, {self.fingerprint[:12]})"

    @property
    def fingerprint(self) -> str:
        """sha256 of the id -> word table (the only thing the model depends on)."""
        return hashlib.sha256("\n".join(self.words).encode("utf-8")).hexdigest()

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Word ids; unknown words map to `<unk>` (1)."""
        return [self.index.get(token, UNK_ID) for token in tokens]

    def decode(self, ids: Iterable[int], *, skip_pad: bool = True) -> list[str]:
        """Words for ids, `<pad>` dropped unless skip_pad is False."""
        return [self.words[int(i)] for i in ids if not (skip_pad and int(i) == PAD_ID)]

    def encode_batch(
        self, token_lists: Sequence[Sequence[str]], max_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids LongTensor (B, L) right-padded with 0, lengths LongTensor (B,)).

        Captions longer than max_len are cut. A caption with no tokens still gets length 1
        (one `<unk>`), so every caption has at least one word to attend to and average.
        """
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        encoded = [self.encode(tokens)[:max_len] or [UNK_ID] for tokens in token_lists]
        lengths = torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
        width = int(lengths.max()) if encoded else 1
        batch = torch.full((len(encoded), width), PAD_ID, dtype=torch.long)
        for row, ids in enumerate(encoded):
            batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return batch, lengths

    def save(self, path: str | Path) -> Path:
        """Write the vocabulary as JSON (words in id order, min_count, fingerprint)."""
        path = Path(path)
        payload = {
            "format": _FORMAT,
            "min_count": self.min_count,
            "fingerprint": self.fingerprint,
            "words": list(self.words),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=0), encoding="utf-8")
        tmp.replace(path)  # atomic: a reader never sees half a vocabulary
        return path

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None) -> Vocabulary:
        """Read a vocabulary saved by `save`; InputError (one line) if unreadable, edited or
        (with expected_fingerprint) not the one a checkpoint was trained with."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: cannot read vocabulary: {err}") from None
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise InputError(f"{path}: not a vocabulary file (format != {_FORMAT!r})")
        words, min_count = payload.get("words"), payload.get("min_count")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise InputError(f"{path}: words: expected a list of strings")
        if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
            raise InputError(f"{path}: min_count: expected a positive integer, got {min_count!r}")
        try:
            vocab = cls(words, min_count=min_count)
        except ValueError as err:
            raise InputError(f"{path}: words: {err}") from None
        if vocab.fingerprint != payload.get("fingerprint"):
            raise InputError(f"{path}: fingerprint does not match the words (file edited?)")
        if expected_fingerprint is not None and vocab.fingerprint != expected_fingerprint:
            raise InputError(
                f"{path}: vocabulary fingerprint {vocab.fingerprint[:12]} differs from the "
                f"expected {expected_fingerprint[:12]}"
            )
        return vocab
