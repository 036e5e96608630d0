"""How the promotion gate's verdict on a version is recorded (``actors.promotion_gate`` decides):
tags of the model version, so that the registry shows it, and metrics of the version's run, so
that MLflow charts it."""

from __future__ import annotations

import json
from typing import Any

VERDICT_TAG = "ttt.verdict"  # promoted | rejected | unjudged | none (no gate: live moved unjudged)
PROMOTED, REJECTED = "promoted", "rejected"
# Figures of a verdict (actors.promotion_gate.Verdict.figures) that a version records.
FIGURES = ("gain_vs_base", "gain_vs_last_good", "forgetting", "heldout_documents", "heldout_loss",
           "documents_learned", "documents_kept_out")


def verdict_tags(verdict: dict[str, Any] | None, lag: int | None) -> dict[str, str]:
    """The model version's tags of a verdict (None: a version no gate judged)."""
    if verdict is None:
        return {VERDICT_TAG: "none"}
    tags = {
        VERDICT_TAG: verdict["verdict"],
        "ttt.verdict_reason": verdict["reason"][:500],
        "ttt.slow_digest": verdict["digest"],
        "ttt.learner_position": str(verdict["position"]),
        "ttt.kept_out": json.dumps(verdict["kept_out"], sort_keys=True),
        **({"ttt.version_lag": str(lag)} if lag is not None else {}),
        **({"ttt.unchanged_update": "true"} if verdict["unchanged"] else {}),
    }
    for name in FIGURES:
        if verdict.get(name) is not None:
            tags[f"ttt.{name}"] = f"{verdict[name]:.6g}"
    return tags


def verdict_metrics(verdict: dict[str, Any] | None) -> dict[str, float]:
    """The version run's metrics of a verdict: its figures, and documents kept out by reason."""
    if verdict is None:
        return {}
    metrics = {f"gate.{name}": float(verdict[name]) for name in FIGURES if verdict.get(name) is not None}
    metrics["gate.promoted"] = float(verdict["verdict"] == PROMOTED)
    for reason, count in verdict["kept_out"].items():
        metrics[f"gate.kept_out.{reason.replace(' ', '_')}"] = float(count)
    return metrics


def servable(tags: dict[str, str]) -> bool:
    """Whether a version's weights may be served (``live``): the gate passed them, or no gate judged
    them (a stream without one, or a version from before it). A rejected or unjudged candidate
    never is, also when a rollback or an offline command copies its states."""
    return tags.get(VERDICT_TAG, "none") in (PROMOTED, "none")
