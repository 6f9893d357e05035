"""Prefect flow `evaluate-retrieval`: stage 3, a thin wrapper over `smlstm.evaluate`.

The flow first validates everything (config, checkpoint, cache identity, protocol, writable
reports directory) in `prepare_evaluation`; a problem fails the run with the one-line message
and nothing written. Then `evaluate` scores the gallery and writes the run's files, logging
through Prefect. The same work runs without Prefect as `smlstm evaluate`.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger

from features.errors import InputError
from smlstm.evaluate import EvalConfig, evaluate, prepare_evaluation

__all__ = ["evaluate_retrieval"]

_DEFAULTS = {name: info.get_default(call_default_factory=True)
             for name, info in EvalConfig.model_fields.items() if not info.is_required()}


@flow(name="evaluate-retrieval")
def evaluate_retrieval(
    checkpoint: str,
    cache: str,
    out: str,
    split: str = _DEFAULTS["split"],
    protocol: Literal["1k", "5k", "coco-1k"] = _DEFAULTS["protocol"],
    captions_per_image: int = _DEFAULTS["captions_per_image"],
    block_budget_mb: float = _DEFAULTS["block_budget_mb"],
    device: str = _DEFAULTS["device"],
    figures: int = _DEFAULTS["figures"],
    encode_batch: int = _DEFAULTS["encode_batch"],
    run_id: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a split of its feature cache; reports go to `out`.

    Returns {"run_id", "scores", "metrics", "ranks", "history", "figures", "rsum",
    "i2t_r1", ..., "t2i_meanr", "seconds", "pairs_per_s", ...}.
    """
    logger = get_run_logger()
    fields = {name: value for name, value in locals().items() if name in EvalConfig.model_fields}
    try:
        prepared = prepare_evaluation(EvalConfig.from_dict(fields, source="evaluate-retrieval"))
    except InputError as err:
        logger.error("error: %s", err)
        raise
    result = evaluate(prepared, log=logger.info)
    logger.info("run %s: rsum %.1f; reports in %s", result.run_id, result.rsum, result.out)
    return result.to_dict()
