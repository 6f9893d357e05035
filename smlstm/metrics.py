"""Retrieval metrics with the exact semantics of model-spec section 7.

Scores `S` are an (N_images, N_captions) float array; `owner[k]` is the image index
(0..N_images-1) that caption k belongs to.

- i2t (image annotation): the rank of an image is the best (lowest) rank among its own captions.
- t2i (image retrieval): the rank of a caption is the rank of its own image.

Ranks are 0-based. The rank of a ground truth g among candidates with scores s is

    rank(g) = #{j : s[j] > s[g]}  +  #{j < g : s[j] == s[g]}

i.e. the position of g in `np.argsort(-s, kind="stable")`: a candidate that ties with the
ground truth counts as ahead of it when it has the lower index. This makes ranks (and so every
metric) deterministic and never optimistic for a model that outputs constant scores.

The fast functions are vectorised and chunked over queries: they never hold more than a
`chunk x N_candidates` block of comparisons. `reference_ranks_i2t` / `reference_ranks_t2i`
are plain argsort loops, kept as the ground truth for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.errors import ConfigError

DEFAULT_CHUNK = 256  # queries per block; 256 x 25k captions of float32 is about 25 MB
RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("r1", "r5", "r10", "medr", "meanr")
PROTOCOLS = ("1k", "5k", "coco-1k")


# ---------------------------------------------------------------------------------------------
# input checks


def _check_inputs(S: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes, finiteness and ownership; return (S, owner as int64)."""
    S = np.asarray(S)
    owner = np.asarray(owner)
    if S.ndim != 2:
        raise ValueError(f"scores: expected a 2-d (images, captions) array, got shape {S.shape}")
    if not np.issubdtype(S.dtype, np.floating):
        S = S.astype(np.float64)
    n_images, n_captions = S.shape
    if owner.shape != (n_captions,):
        raise ValueError(
            f"owner: expected shape ({n_captions},) to match the scores' columns, got {owner.shape}"
        )
    if not np.issubdtype(owner.dtype, np.integer):
        raise ValueError(f"owner: expected integer image indices, got dtype {owner.dtype}")
    if n_images == 0 or n_captions == 0:
        raise ValueError(f"scores: empty score matrix of shape {S.shape}")
    owner = owner.astype(np.int64, copy=False)
    if owner.min() < 0 or owner.max() >= n_images:
        raise ValueError(
            f"owner: image indices must lie in 0..{n_images - 1}, got {owner.min()}..{owner.max()}"
        )
    # Every image needs at least one caption, or its i2t rank is undefined.
    counts = np.bincount(owner, minlength=n_images)
    if (counts == 0).any():
        first = int(np.flatnonzero(counts == 0)[0])
        raise ValueError(
            f"owner: image {first} has no captions ({int((counts == 0).sum())} such images)"
        )
    # NaN compares false both ways and would silently give rank 0; refuse it.
    if not np.isfinite(S).all():
        raise ValueError("scores: contain NaN or infinite values")
    return S, owner


# ---------------------------------------------------------------------------------------------
# fast ranks


def _ranks_against(block: np.ndarray, gt_col: np.ndarray) -> np.ndarray:
    """Ranks of one ground-truth column per row of `block` (rows = queries, cols = candidates)."""
    rows = np.arange(block.shape[0])
    gt_score = block[rows, gt_col][:, None]
    ahead = (block > gt_score).sum(axis=1)
    # Equal scores at a lower candidate index count as ahead (the stable argsort order).
    lower = np.arange(block.shape[1])[None, :] < gt_col[:, None]
    ahead += ((block == gt_score) & lower).sum(axis=1)
    return ahead


def i2t_ranks(S: np.ndarray, owner: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Rank of each image (0-based) = the best rank among its own captions; shape (N_images,).

    The best own caption is the one first in (score descending, index ascending) order: its
    rank is the minimum over the image's captions because that order is total.
    """
    S, owner = _check_inputs(S, owner)
    n_images = S.shape[0]
    ranks = np.empty(n_images, dtype=np.int64)
    for start in range(0, n_images, chunk):
        stop = min(start + chunk, n_images)
        block = S[start:stop]
        own = owner[None, :] == np.arange(start, stop)[:, None]
        # argmax returns the first maximum: the lowest-index caption among tied best ones.
        best = np.argmax(np.where(own, block, -np.inf), axis=1)
        ranks[start:stop] = _ranks_against(block, best)
    return ranks


def t2i_ranks(S: np.ndarray, owner: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Rank of each caption's own image among all images (0-based); shape (N_captions,)."""
    S, owner = _check_inputs(S, owner)
    n_captions = S.shape[1]
    ranks = np.empty(n_captions, dtype=np.int64)
    for start in range(0, n_captions, chunk):
        stop = min(start + chunk, n_captions)
        block = np.ascontiguousarray(S[:, start:stop].T)  # (chunk, N_images)
        ranks[start:stop] = _ranks_against(block, owner[start:stop])
    return ranks


# ---------------------------------------------------------------------------------------------
# reference ranks (plain loops; for tests)


def reference_ranks_i2t(S: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """i2t ranks by a stable argsort per image: the slow, obvious definition."""
    S, owner = _check_inputs(S, owner)
    ranks = np.empty(S.shape[0], dtype=np.int64)
    for i in range(S.shape[0]):
        order = np.argsort(-S[i], kind="stable")
        ranks[i] = np.flatnonzero(owner[order] == i)[0]
    return ranks


def reference_ranks_t2i(S: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """t2i ranks by a stable argsort per caption: the slow, obvious definition."""
    S, owner = _check_inputs(S, owner)
    ranks = np.empty(S.shape[1], dtype=np.int64)
    for k in range(S.shape[1]):
        order = np.argsort(-S[:, k], kind="stable")
        ranks[k] = np.flatnonzero(order == owner[k])[0]
    return ranks


# ---------------------------------------------------------------------------------------------
# metrics


def recall_metrics(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (percent), medr = floor(median)+1 and meanr = mean+1 of 0-based ranks."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("ranks: empty")
    out = {f"r{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_KS}
    out["medr"] = float(np.floor(np.median(ranks)) + 1)
    out["meanr"] = float(np.mean(ranks) + 1)
    return out


def retrieval_metrics(
    S: np.ndarray, owner: np.ndarray, chunk: int = DEFAULT_CHUNK
) -> dict[str, float]:
    """Both directions on one gallery: keys i2t_r1.. i2t_meanr, t2i_r1.. t2i_meanr and rsum."""
    i2t = recall_metrics(i2t_ranks(S, owner, chunk))
    t2i = recall_metrics(t2i_ranks(S, owner, chunk))
    out = {f"i2t_{key}": value for key, value in i2t.items()}
    out.update({f"t2i_{key}": value for key, value in t2i.items()})
    out["rsum"] = sum(i2t[f"r{k}"] + t2i[f"r{k}"] for k in RECALL_KS)
    return out


def _rows_for(metrics: dict[str, float], protocol: str, fold: str | int) -> list[dict]:
    """Long format: one row per direction, plus a `both` row that holds only rsum.

    Direction rows leave rsum empty and the `both` row leaves R@K/medr/meanr empty, so no
    column ever mixes two meanings and summing `rsum` over a fold's rows gives the rsum.
    """
    rows = []
    for direction in ("i2t", "t2i"):
        row = {"protocol": protocol, "fold": fold, "direction": direction}
        row.update({key: metrics[f"{direction}_{key}"] for key in METRIC_KEYS})
        row["rsum"] = None
        rows.append(row)
    both = {"protocol": protocol, "fold": fold, "direction": "both"}
    both.update({key: None for key in METRIC_KEYS})
    both["rsum"] = metrics["rsum"]
    rows.append(both)
    return rows


def fold_slices(owner: np.ndarray, n_images: int, folds: int) -> list[tuple[slice, np.ndarray]]:
    """Split a gallery into `folds` equal blocks of consecutive images.

    Returns per fold (image slice, caption indices owned by those images). Raises ConfigError
    when the images do not divide evenly.
    """
    if folds < 1 or n_images % folds != 0:
        raise ConfigError(
            f"protocol coco-1k: {n_images} images cannot be split into {folds} equal folds "
            f"(COCO 1K expects the 5000-image test split)"
        )
    size = n_images // folds
    owner = np.asarray(owner)
    out = []
    for f in range(folds):
        images = slice(f * size, (f + 1) * size)
        captions = np.flatnonzero((owner >= images.start) & (owner < images.stop))
        out.append((images, captions))
    return out


def evaluate(
    S: np.ndarray,
    owner: np.ndarray,
    protocol: str,
    folds: int = 5,
    chunk: int = DEFAULT_CHUNK,
) -> list[dict]:
    """Evaluate a gallery under a named protocol; returns long-format rows.

    Each row: protocol, fold ("all", "mean" or 0..folds-1), direction ("i2t", "t2i", "both"),
    r1, r5, r10, medr, meanr, rsum (see `_rows_for` for which are empty where).

    - "1k": the whole gallery at once, as given (Flickr8K/30K: the 1000 test images).
    - "5k": the whole gallery at once (COCO 5K).
    - "coco-1k": `folds` equal blocks of consecutive images, each with the captions its images
      own; every metric, rsum included, is the mean of the per-fold values (fold "mean").
    """
    S, owner = _check_inputs(S, owner)
    if protocol in ("1k", "5k"):
        return _rows_for(retrieval_metrics(S, owner, chunk), protocol, "all")
    if protocol != "coco-1k":
        raise ConfigError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")

    rows: list[dict] = []
    for f, (images, captions) in enumerate(fold_slices(owner, S.shape[0], folds)):
        fold_scores = S[images][:, captions]
        fold_owner = owner[captions] - images.start
        rows += _rows_for(retrieval_metrics(fold_scores, fold_owner, chunk), protocol, f)

    # Average each (direction, metric) over the folds; rsum is averaged, never recomputed
    # from averaged recalls (equal here since it is linear, but medr/meanr are not).
    per_fold = pd.DataFrame(rows)
    keys = [*METRIC_KEYS, "rsum"]
    for direction in ("i2t", "t2i", "both"):
        part = per_fold[per_fold["direction"] == direction]
        mean = {"protocol": protocol, "fold": "mean", "direction": direction}
        for key in keys:
            values = part[key].dropna()
            mean[key] = float(values.mean()) if len(values) else None
        rows.append(mean)
    return rows


# ---------------------------------------------------------------------------------------------
# caption selection and top-k


@dataclass(frozen=True)
class CaptionSelection:
    """Which captions enter an evaluation and who owns them.

    image_keys: (N_images,) the image identifiers (e.g. cache rows) in score-row order.
    positions: (N_captions,) positions into the input captions, in score-column order.
    owner: (N_captions,) index into `image_keys` of each selected caption's image.
    """

    image_keys: np.ndarray
    positions: np.ndarray
    owner: np.ndarray


def select_captions(
    captions: pd.DataFrame | tuple[np.ndarray, np.ndarray],
    per_image: int | None = 5,
    image_key: str = "row",
    image_keys: np.ndarray | None = None,
) -> CaptionSelection:
    """Keep the first `per_image` captions of each image (by caption_index); None keeps all.

    `captions` is a DataFrame with columns `image_key` (default "row") and "caption_index"
    (the cache's captions.parquet), or a pair of arrays (image key, caption index).
    Images with fewer captions keep all they have. Images are ordered by `image_keys` when given
    (captions of other images are dropped; a listed image with no caption is an error),
    otherwise by sorted key. Captions are ordered by (image, caption_index).
    """
    if isinstance(captions, pd.DataFrame):
        keys = captions[image_key].to_numpy()
        index = captions["caption_index"].to_numpy()
    else:
        keys, index = (np.asarray(a) for a in captions)
    if keys.shape != index.shape or keys.ndim != 1:
        raise ValueError(
            f"captions: image keys {keys.shape} and caption indices {index.shape} differ"
        )
    if per_image is not None and per_image < 1:
        raise ValueError(f"per_image: expected a positive number or None, got {per_image}")

    if image_keys is None:
        image_keys = np.unique(keys)
    image_index = pd.Index(image_keys)
    if not image_index.is_unique:
        raise ValueError("image_keys: contain duplicates")
    image_keys = image_index.to_numpy()
    owner = image_index.get_indexer(keys)  # -1: caption of an image that is not evaluated

    kept = np.flatnonzero(owner >= 0)
    order = kept[np.lexsort((index[kept], owner[kept]))]  # by image, then caption_index
    sorted_owner = owner[order]
    # Position of each caption within its image's run of captions.
    run_start = np.searchsorted(sorted_owner, sorted_owner, side="left")
    within = np.arange(len(order)) - run_start
    if per_image is not None:
        order, sorted_owner = order[within < per_image], sorted_owner[within < per_image]

    counts = np.bincount(sorted_owner, minlength=len(image_keys))
    if (counts == 0).any():
        missing = image_keys[np.flatnonzero(counts == 0)[0]]
        missing = missing.item() if isinstance(missing, np.generic) else missing
        raise ValueError(f"captions: image {missing!r} has no captions")
    return CaptionSelection(
        image_keys=image_keys, positions=order, owner=sorted_owner.astype(np.int64)
    )


def top_k(scores: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k best candidates of one query, best first.

    Ties are ordered by lower index first, the same rule as the ranks.
    """
    scores = np.asarray(scores)
    n = scores.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.int64), scores[:0]
    threshold = np.partition(scores, n - k)[n - k]  # the k-th largest score
    candidates = np.flatnonzero(scores >= threshold)  # ascending index; ties included
    best = candidates[np.argsort(-scores[candidates], kind="stable")[:k]]
    return best.astype(np.int64), scores[best]


def top_k_rows(block: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` for every row of a (queries, candidates) block: ids and scores, (queries, k)."""
    block = np.asarray(block)
    m, n = block.shape
    k = min(k, n)
    if k == 0:
        return np.empty((m, 0), dtype=np.int64), block[:, :0]
    threshold = np.partition(block, n - k, axis=1)[:, n - k : n - k + 1]
    ids = np.argpartition(block, n - k, axis=1)[:, n - k :]
    # argpartition picks an arbitrary member among ties at the k-th score; the rows with such
    # boundary ties (rare for real scores) go through the exact per-row path instead.
    tied = (block >= threshold).sum(axis=1) > k
    vals = np.take_along_axis(block, ids, axis=1)
    order = np.lexsort((ids, -vals), axis=1)
    ids = np.take_along_axis(ids, order, axis=1).astype(np.int64)
    for r in np.flatnonzero(tied):
        ids[r] = top_k(block[r], k)[0]
    return ids, np.take_along_axis(block, ids, axis=1)
