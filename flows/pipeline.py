"""Prefect flow `pipeline`: extract -> train -> evaluate as one DAG, skipping finished stages.

Each stage runs as its own subflow (`extract-features`, `train-smlstm`, `evaluate-retrieval`),
so the UI shows the DAG and each stage keeps its own logs and retries. Before a stage runs, a
`check-<stage>` task asks the library whether that stage's outputs are complete and were made
with the same config (the cache's done-markers and identity, the run's checkpoint and config,
the reports' run for that checkpoint); if so a `skip-<stage>` task finishes in the state
named "Skipped" and nothing is recomputed or rewritten.

Every stage config is validated before anything runs, so a bad parameter fails the run with a
one-line message and no output. Paths: `<workdir>/cache`, `<workdir>/run`, `<workdir>/reports`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.states import Completed

from features.config import ExtractConfig
from features.errors import ConfigError, InputError
from features.extract import extraction_complete
from flows.evaluate import evaluate_retrieval
from flows.extract import extract_features
from flows.train import train_smlstm
from smlstm.evaluate import EvalConfig, evaluation_complete
from smlstm.train import TrainConfig, training_complete, validate_config

__all__ = ["PipelineConfigs", "pipeline", "resolve_configs"]

# Options of the stage flows that are not part of the stage's config object.
EXTRACT_FLOW_OPTIONS = ("dask_address", "local_cluster_workers")
TRAIN_FLOW_OPTIONS = ("gpus",)


@dataclass(frozen=True)
class PipelineConfigs:
    """The three validated stage configs of one pipeline run, plus each flow's extra options."""

    extract: ExtractConfig
    train: TrainConfig
    evaluate: EvalConfig
    extract_options: dict[str, Any]
    train_options: dict[str, Any]


def _split_options(options: dict[str, Any], flow_only: tuple[str, ...]):
    config = {k: v for k, v in options.items() if k not in flow_only}
    extra = {k: v for k, v in options.items() if k in flow_only}
    return config, extra


def resolve_configs(
    dataset: str,
    images: str,
    workdir: str,
    weights: str = "imagenet",
    seed: int = 0,
    extract: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    evaluate: dict[str, Any] | None = None,
) -> PipelineConfigs:
    """Validate all three stage configs (pure: reads nothing, writes nothing)."""
    root = Path(workdir)
    cache, run, reports = str(root / "cache"), str(root / "run"), str(root / "reports")
    extract_fields, extract_options = _split_options(dict(extract or {}), EXTRACT_FLOW_OPTIONS)
    train_fields, train_options = _split_options(dict(train or {}), TRAIN_FLOW_OPTIONS)
    for name, given in (("extract", extract_fields), ("train", train_fields),
                        ("evaluate", dict(evaluate or {}))):
        clash = sorted(set(given) & {"out", "cache", "checkpoint", "dataset", "images"})
        if clash:
            raise ConfigError(f"pipeline: {name}.{clash[0]}: set by the pipeline from workdir")
    extract_config = ExtractConfig.from_dict(
        {"dataset": dataset, "images": images, "out": cache, "weights": weights, "seed": seed,
         **extract_fields},
        source="pipeline extract",
    )
    train_config = validate_config({"cache": cache, "out": run, **train_fields},
                                   source="pipeline train")
    evaluate_config = EvalConfig.from_dict(
        {"checkpoint": str(Path(run) / "checkpoints" / "best.pt"), "cache": cache,
         "out": reports, **(evaluate or {})},
        source="pipeline evaluate",
    )
    return PipelineConfigs(extract_config, train_config, evaluate_config,
                           extract_options, train_options)


@task(name="check-stage", task_run_name="check-{stage}")
def check_stage(stage: str, config: dict[str, Any]) -> bool:
    """True when the stage's outputs are complete and match its config."""
    if stage == "extract":
        return extraction_complete(ExtractConfig.from_dict(config))
    if stage == "train":
        return training_complete(validate_config(config))
    return evaluation_complete(EvalConfig.from_dict(config))


@task(name="skip-stage", task_run_name="skip-{stage}")
def skip_stage(stage: str, reason: str):
    """Record in Prefect that a stage was skipped (state name "Skipped")."""
    return Completed(name="Skipped", message=f"{stage}: {reason}")


@flow(name="pipeline")
def pipeline(
    dataset: str,
    images: str,
    workdir: str,
    weights: Literal["imagenet", "random"] = "imagenet",
    seed: int = 0,
    extract: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    evaluate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run extract-features -> train-smlstm -> evaluate-retrieval, skipping finished stages.

    `extract`, `train`, `evaluate`: the stage flows' parameters (e.g. {"image_size": 224},
    {"preset": "small", "epochs": 10}, {"protocol": "5k"}); paths come from `workdir`.
    Returns the paths of the cache, the run, the reports and each stage's outcome.
    """
    logger = get_run_logger()
    try:
        configs = resolve_configs(dataset, images, workdir, weights, seed,
                                  extract, train, evaluate)
    except InputError as err:
        logger.error("error: %s", err)
        raise
    outcome: dict[str, str] = {}

    extract_config = configs.extract.to_dict()
    if check_stage("extract", extract_config):
        skip_stage("extract", "cache complete with this config")
        outcome["extract"] = "skipped"
    else:
        extract_features(**extract_config, **configs.extract_options)
        outcome["extract"] = "ran"

    train_config = configs.train.to_dict()
    if check_stage("train", train_config):
        skip_stage("train", "run finished with this config and cache")
        outcome["train"] = "skipped"
    else:
        # A run killed part-way resumes from its latest checkpoint instead of starting over.
        train_config["resume"] = (Path(configs.train.out) / "checkpoints" / "latest.pt").exists()
        train_smlstm(**train_config, **configs.train_options)
        outcome["train"] = "ran"

    evaluate_config = configs.evaluate.to_dict()
    if check_stage("evaluate", evaluate_config):
        skip_stage("evaluate", "report for this checkpoint, cache and config exists")
        outcome["evaluate"] = "skipped"
    else:
        result = evaluate_retrieval(**evaluate_config)
        outcome["evaluate"] = "ran"
        logger.info("rsum %.1f; reports in %s", result.get("rsum", float("nan")),
                    configs.evaluate.out)

    logger.info("pipeline stages: %s", outcome)
    return {
        "cache": configs.extract.out,
        "run": configs.train.out,
        "reports": configs.evaluate.out,
        "stages": outcome,
    }
