"""Ranks, recall metrics, protocols and caption selection (smlstm/metrics.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.errors import ConfigError
from smlstm import metrics


def random_gallery(rng: np.random.Generator, n_images: int, max_captions: int):
    """Tie-free random scores; each image owns 1..max_captions captions, columns shuffled."""
    counts = rng.integers(1, max_captions + 1, size=n_images)
    owner = rng.permutation(np.repeat(np.arange(n_images), counts))
    # Distinct values by construction: a random permutation of 0..N-1, as floats.
    scores = rng.permutation(n_images * len(owner)).reshape(n_images, len(owner)).astype(np.float32)
    return scores, owner


@pytest.mark.parametrize("n_images,max_captions", [(1, 3), (6, 1), (13, 7), (40, 5)])
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_ranks_equal_argsort_reference_without_ties(n_images, max_captions, chunk):
    rng = np.random.default_rng(n_images * 100 + max_captions)
    S, owner = random_gallery(rng, n_images, max_captions)
    np.testing.assert_array_equal(
        metrics.i2t_ranks(S, owner, chunk), metrics.reference_ranks_i2t(S, owner)
    )
    np.testing.assert_array_equal(
        metrics.t2i_ranks(S, owner, chunk), metrics.reference_ranks_t2i(S, owner)
    )


def test_ties_are_broken_by_lower_index_first():
    # captions:  c0  c1  c2  c3        owner: c0 -> i1, c1 -> i2, c2 -> i0, c3 -> i2
    S = np.array(
        [
            [0.2, 0.7, 0.7, 0.5],  # i0 owns c2 (0.7); c1 ties at a lower index -> rank 1
            [0.7, 0.7, 0.3, 0.7],  # i1 owns c0 (0.7); it is the lowest index of the tie -> 0
            [0.5, 0.5, 0.5, 0.5],  # i2 owns c1, c3; best is c1, c0 ties ahead of it -> 1
        ]
    )
    owner = np.array([1, 2, 0, 2])
    # t2i, per column: c0 [.2 .7 .5] gt i1 -> 0;  c1 [.7 .7 .5] gt i2 -> 2 (two higher);
    #                  c2 [.7 .3 .5] gt i0 -> 0;  c3 [.5 .7 .5] gt i2 -> 1 higher + i0 tie = 2
    for chunk in (1, 2, 10):
        np.testing.assert_array_equal(metrics.i2t_ranks(S, owner, chunk), [1, 0, 1])
        np.testing.assert_array_equal(metrics.t2i_ranks(S, owner, chunk), [0, 2, 0, 2])
    np.testing.assert_array_equal(metrics.reference_ranks_i2t(S, owner), [1, 0, 1])
    np.testing.assert_array_equal(metrics.reference_ranks_t2i(S, owner), [0, 2, 0, 2])


def test_constant_scores_are_not_optimistic():
    # With all scores equal, a ground truth is ahead only of higher indices.
    owner = np.array([2, 0, 1, 2, 0, 1])
    S = np.zeros((3, 6), dtype=np.float32)
    np.testing.assert_array_equal(metrics.i2t_ranks(S, owner), [1, 2, 0])  # first own caption
    np.testing.assert_array_equal(metrics.t2i_ranks(S, owner), owner)


def test_ranks_on_random_data_with_many_ties_match_reference():
    rng = np.random.default_rng(7)
    owner = rng.permutation(np.repeat(np.arange(25), 4))
    S = rng.integers(0, 4, size=(25, 100)).astype(np.float16)  # heavy ties
    for chunk in (1, 6, 64):
        np.testing.assert_array_equal(
            metrics.i2t_ranks(S, owner, chunk), metrics.reference_ranks_i2t(S, owner)
        )
        np.testing.assert_array_equal(
            metrics.t2i_ranks(S, owner, chunk), metrics.reference_ranks_t2i(S, owner)
        )


def test_bad_inputs_are_refused():
    S = np.zeros((2, 3))
    with pytest.raises(ValueError, match="image 1 has no captions"):
        metrics.i2t_ranks(S, np.array([0, 0, 0]))
    with pytest.raises(ValueError, match="must lie in 0..1"):
        metrics.t2i_ranks(S, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.i2t_ranks(np.array([[np.nan, 0.0]]), np.array([0, 0]))
    with pytest.raises(ValueError, match="shape"):
        metrics.i2t_ranks(S, np.array([0, 1]))


def test_recall_metrics_hand_computed():
    got = metrics.recall_metrics(np.array([0, 1, 2, 10]))
    assert got == {"r1": 25.0, "r5": 75.0, "r10": 75.0, "medr": 2.0, "meanr": 4.25}
    got = metrics.recall_metrics(np.array([0, 0, 4, 9, 30]))
    assert got["r1"] == 40.0 and got["r5"] == 60.0 and got["r10"] == 80.0
    assert got["medr"] == 5.0  # median 4 -> floor(4) + 1
    assert got["meanr"] == pytest.approx(43 / 5 + 1)


def test_retrieval_metrics_rsum_is_the_six_recalls():
    rng = np.random.default_rng(3)
    S, owner = random_gallery(rng, 30, 5)
    got = metrics.retrieval_metrics(S, owner)
    six = [got[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert got["rsum"] == pytest.approx(sum(six))
    assert got["i2t_medr"] == np.floor(np.median(metrics.reference_ranks_i2t(S, owner))) + 1


def test_whole_gallery_protocols_give_one_fold():
    rng = np.random.default_rng(4)
    S, owner = random_gallery(rng, 20, 5)
    expected = metrics.retrieval_metrics(S, owner)
    for protocol in ("1k", "5k"):
        rows = metrics.evaluate(S, owner, protocol)
        assert {(r["fold"], r["direction"]) for r in rows} == {
            ("all", "i2t"),
            ("all", "t2i"),
            ("all", "both"),
        }
        by_direction = {r["direction"]: r for r in rows}
        assert by_direction["i2t"]["r5"] == expected["i2t_r5"]
        assert by_direction["t2i"]["meanr"] == expected["t2i_meanr"]
        assert by_direction["both"]["rsum"] == expected["rsum"]
        assert by_direction["i2t"]["rsum"] is None and by_direction["both"]["r1"] is None


def test_coco_1k_folds_on_the_5000_image_layout():
    """Each fold sees only its 1000 images and their 5000 captions; metrics average per fold.

    Inside fold f, S[i, k] = -((owner(k) - i - f) mod 1000): image i's own captions have
    distance (1000 - f) mod 1000, so its i2t rank is 5 * ((1000 - f) mod 1000) and a caption's
    t2i rank is (1000 - f) mod 1000. Scores across folds are 1000, above everything inside a
    fold: any leak of another fold's images or captions would wreck the ranks.
    """
    n_images, per_image, fold_size = 5000, 5, 1000
    rng = np.random.default_rng(0)
    owner = rng.permutation(np.repeat(np.arange(n_images), per_image))  # shuffled columns
    S = np.full((n_images, len(owner)), 1000, dtype=np.float16)  # float16: exact integers here
    for f in range(5):
        images = np.arange(f * fold_size, (f + 1) * fold_size)
        captions = np.flatnonzero(owner // fold_size == f)
        assert len(captions) == fold_size * per_image
        local_owner = owner[captions] - f * fold_size
        block = -((local_owner[None, :] - (images - f * fold_size)[:, None] - f) % fold_size)
        S[np.ix_(images, captions)] = block

    rows = metrics.evaluate(S, owner, "coco-1k")
    table = pd.DataFrame(rows)
    assert sorted(table["fold"].astype(str).unique()) == ["0", "1", "2", "3", "4", "mean"]

    i2t_rank = [5 * ((1000 - f) % 1000) for f in range(5)]  # 0, 4995, 4990, 4985, 4980
    t2i_rank = [(1000 - f) % 1000 for f in range(5)]  # 0, 999, 998, 997, 996
    per_fold = table[table["fold"] != "mean"].set_index(["fold", "direction"])
    for f in range(5):
        assert per_fold.loc[(f, "i2t"), "medr"] == i2t_rank[f] + 1
        assert per_fold.loc[(f, "t2i"), "meanr"] == t2i_rank[f] + 1
        assert per_fold.loc[(f, "both"), "rsum"] == (600.0 if f == 0 else 0.0)

    mean = table[table["fold"] == "mean"].set_index("direction")
    # medr is averaged over folds: (1 + 4996 + 4991 + 4986 + 4981) / 5, not the pooled median.
    assert mean.loc["i2t", "medr"] == pytest.approx(np.mean([r + 1 for r in i2t_rank]))
    assert mean.loc["i2t", "medr"] == pytest.approx(3991.0)
    assert mean.loc["t2i", "medr"] == pytest.approx(799.0)
    assert mean.loc["t2i", "r1"] == pytest.approx(20.0)
    assert mean.loc["both", "rsum"] == pytest.approx(120.0)


def test_coco_1k_generalises_and_checks_divisibility():
    rng = np.random.default_rng(5)
    S, owner = random_gallery(rng, 30, 3)
    rows = pd.DataFrame(metrics.evaluate(S, owner, "coco-1k", folds=3))
    fold_rsums = rows[(rows["direction"] == "both") & (rows["fold"] != "mean")]["rsum"]
    assert len(fold_rsums) == 3
    mean_rsum = rows[(rows["direction"] == "both") & (rows["fold"] == "mean")]["rsum"].item()
    assert mean_rsum == pytest.approx(fold_rsums.mean())
    # Fold 1 on its own: images 10..19 and only the captions they own.
    captions = np.flatnonzero((owner >= 10) & (owner < 20))
    alone = metrics.retrieval_metrics(S[10:20][:, captions], owner[captions] - 10)
    fold1 = rows[(rows["fold"] == 1) & (rows["direction"] == "t2i")].iloc[0]
    assert fold1["r5"] == alone["t2i_r5"] and fold1["medr"] == alone["t2i_medr"]

    with pytest.raises(ConfigError, match="31 images cannot be split into 5 equal folds"):
        S31, owner31 = random_gallery(rng, 31, 2)
        metrics.evaluate(S31, owner31, "coco-1k")
    with pytest.raises(ConfigError, match="protocol"):
        metrics.evaluate(S, owner, "10k")


def test_select_captions_keeps_first_k_by_caption_index():
    # image 7 has 7 captions, image 3 has 2, image 5 has 1; input order is scrambled.
    frame = pd.DataFrame(
        {
            "row": [7, 3, 7, 7, 5, 7, 7, 3, 7, 7],
            "caption_index": [6, 1, 0, 3, 0, 1, 5, 0, 2, 4],
        }
    )
    sel = metrics.select_captions(frame, per_image=5)
    np.testing.assert_array_equal(sel.image_keys, [3, 5, 7])
    kept = frame.iloc[sel.positions]
    assert list(kept["row"]) == [3, 3, 5, 7, 7, 7, 7, 7]
    assert list(kept["caption_index"]) == [0, 1, 0, 0, 1, 2, 3, 4]
    np.testing.assert_array_equal(sel.owner, [0, 0, 1, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(sel.image_keys[sel.owner], kept["row"])

    everything = metrics.select_captions(
        (frame["row"].to_numpy(), frame["caption_index"].to_numpy()), per_image=None
    )
    assert len(everything.positions) == len(frame)

    ordered = metrics.select_captions(frame, per_image=1, image_keys=np.array([7, 3]))
    assert list(frame.iloc[ordered.positions]["row"]) == [7, 3]  # image 5 dropped
    np.testing.assert_array_equal(ordered.owner, [0, 1])

    with pytest.raises(ValueError, match="image 9 has no captions"):
        metrics.select_captions(frame, image_keys=np.array([3, 9]))


def test_top_k_orders_ties_by_index():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.5, 0.5, 0.2])
    ids, vals = metrics.top_k(scores, 4)
    np.testing.assert_array_equal(ids, [1, 3, 2, 4])
    np.testing.assert_array_equal(vals, [0.9, 0.9, 0.5, 0.5])
    assert len(metrics.top_k(scores, 50)[0]) == len(scores)

    rng = np.random.default_rng(9)
    block = rng.integers(0, 6, size=(40, 30)).astype(np.float32)  # many boundary ties
    ids, vals = metrics.top_k_rows(block, 10)
    for r in range(len(block)):
        expected = np.argsort(-block[r], kind="stable")[:10]
        np.testing.assert_array_equal(ids[r], expected)
        np.testing.assert_array_equal(vals[r], block[r, expected])
