"""Vocabulary: train-only building, min count, order, encode/decode, batches, save/load."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from features.dataset import load_karpathy
from features.errors import InputError
from smlstm.text import PAD_ID, UNK_ID, Vocabulary

FIXTURE = Path(__file__).parent / "data" / "karpathy_small.json"


def captions_of(dataset, split):
    return [list(c.tokens) for im in dataset.split(split) for c in im.captions]


def test_train_only_vocabulary_has_no_test_words():
    dataset = load_karpathy(FIXTURE)
    vocab = Vocabulary.build(captions_of(dataset, "train"))
    train_words = {w for tokens in captions_of(dataset, "train") for w in tokens}
    test_only = {w for tokens in captions_of(dataset, "test") for w in tokens} - train_words
    assert test_only  # the fixture has words seen only in test ("zebra", "giraffe")
    assert not test_only & set(vocab.words)
    assert set(vocab.words[2:]) == train_words
    test_caption = captions_of(dataset, "test")[0]
    encoded = vocab.encode(test_caption)
    for word, index in zip(test_caption, encoded, strict=True):
        assert (index == UNK_ID) == (word in test_only)


def test_special_ids_and_order():
    vocab = Vocabulary.build([["b", "a", "c"], ["a", "c"], ["c"], ["y", "x"]])
    assert vocab.words[PAD_ID] == "<pad>" and vocab.words[UNK_ID] == "<unk>"
    # descending count (c=3, a=2), then alphabetical among equal counts (b, x, y = 1)
    assert vocab.words[2:] == ("c", "a", "b", "x", "y")
    assert len(vocab) == 7
    # the same captions in another order give the same table
    assert Vocabulary.build([["y", "x"], ["c"], ["a", "c"], ["b", "a", "c"]]) == vocab


def test_min_count():
    token_lists = [["dog", "runs"], ["dog", "sits"], ["cat", "sits"], ["dog"]]
    counts = Counter(t for tokens in token_lists for t in tokens)
    for min_count in (1, 2, 3):
        vocab = Vocabulary.build(token_lists, min_count=min_count)
        assert set(vocab.words[2:]) == {w for w, c in counts.items() if c >= min_count}
        assert vocab.min_count == min_count
    assert vocab.encode(["cat", "dog"]) == [UNK_ID, vocab.index["dog"]]
    with pytest.raises(ValueError):
        Vocabulary.build(token_lists, min_count=0)


def test_constructor_checks_the_table():
    assert Vocabulary(["<pad>", "<unk>", "dog"]).encode(["dog", "cat"]) == [2, UNK_ID]
    with pytest.raises(ValueError):
        Vocabulary(["dog", "<pad>", "<unk>"])
    with pytest.raises(ValueError):
        Vocabulary(["<pad>", "<unk>", "dog", "dog"])
    with pytest.raises(TypeError):
        Vocabulary(["<pad>", "<unk>", 3])


def test_specials_in_text_do_not_move():
    vocab = Vocabulary.build([["<unk>", "<pad>", "dog"]])
    assert vocab.words == ("<pad>", "<unk>", "dog")


def test_encode_decode_round_trip():
    vocab = Vocabulary.build([["a", "dog", "in", "the", "snow"]])
    tokens = ["the", "dog", "in", "a", "snow"]
    assert vocab.decode(vocab.encode(tokens)) == tokens
    assert vocab.decode([vocab.index["dog"], PAD_ID, PAD_ID]) == ["dog"]
    assert vocab.decode(torch.tensor([vocab.index["dog"], PAD_ID]), skip_pad=False) == [
        "dog",
        "<pad>",
    ]


def test_encode_batch_pads_and_counts():
    vocab = Vocabulary.build([["a", "red", "circle", "above", "a", "blue", "square"]])
    batch = [
        ["a", "red", "circle"],
        ["blue"],
        [],
        ["zebra", "giraffe"],
        ["a", "red", "circle", "above", "a"],
    ]
    ids, lengths = vocab.encode_batch(batch)
    assert ids.dtype == torch.long and lengths.dtype == torch.long
    assert ids.shape == (5, 5)
    assert lengths.tolist() == [3, 1, 1, 2, 5]  # the empty caption keeps one <unk>
    for row, tokens in enumerate(batch):
        n = int(lengths[row])
        expected = vocab.encode(tokens) or [UNK_ID]
        assert ids[row, :n].tolist() == expected
        assert (ids[row, n:] == PAD_ID).all()
    assert ids[2, 0] == UNK_ID and ids[3, :2].tolist() == [UNK_ID, UNK_ID]


def test_encode_batch_max_len():
    vocab = Vocabulary.build([["a", "b", "c", "d"]])
    ids, lengths = vocab.encode_batch([["a", "b", "c", "d"], ["b"]], max_len=2)
    assert ids.shape == (2, 2)
    assert lengths.tolist() == [2, 1]
    assert ids[0].tolist() == vocab.encode(["a", "b"])
    with pytest.raises(ValueError):
        vocab.encode_batch([["a"]], max_len=0)


def test_save_load_round_trip(tmp_path):
    dataset = load_karpathy(FIXTURE)
    vocab = Vocabulary.build(captions_of(dataset, "train"), min_count=2)
    path = vocab.save(tmp_path / "sub" / "vocab.json")
    loaded = Vocabulary.load(path)
    assert loaded == vocab
    assert loaded.words == vocab.words
    assert loaded.min_count == 2
    assert loaded.fingerprint == vocab.fingerprint
    assert Vocabulary.load(path, expected_fingerprint=vocab.fingerprint) == vocab
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["fingerprint"] == vocab.fingerprint and payload["min_count"] == 2


def test_fingerprint_depends_on_the_table():
    a = Vocabulary.build([["dog", "cat"]])
    b = Vocabulary.build([["dog", "cat", "dog"]])  # same words, other ids (dog first)
    assert set(a.words) == set(b.words)
    assert a.fingerprint != b.fingerprint


def test_load_refuses_edited_or_foreign_files(tmp_path):
    vocab = Vocabulary.build([["dog", "cat", "cat"]])
    path = vocab.save(tmp_path / "vocab.json")
    with pytest.raises(InputError, match="differs from the expected"):
        Vocabulary.load(path, expected_fingerprint="0" * 64)

    payload = json.loads(path.read_text(encoding="utf-8"))
    payload["words"][2], payload["words"][3] = payload["words"][3], payload["words"][2]
    path.write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(InputError, match="fingerprint does not match"):
        Vocabulary.load(path)

    (tmp_path / "other.json").write_text('{"images": []}', encoding="utf-8")
    with pytest.raises(InputError, match="not a vocabulary"):
        Vocabulary.load(tmp_path / "other.json")
    with pytest.raises(InputError, match="cannot read"):
        Vocabulary.load(tmp_path / "missing.json")
