"""The application layer: a command's session and the stages behind every command.

data → model (model.py) → factors (factors.py) → scores (scores.py) → score tables (explain.py)
and the CI gate / report (gate.py). A ``--shard i/n`` job is a session with ``shard`` set:
the same stages do its block and write shard files (shards.py, shard_files.py) that
`infl merge` (merge.py) combines. Each stage does the earlier ones it needs, reuses outputs
that are still valid (content hashes, data fingerprints) and never trusts stale ones. The
commands call exactly one of these and render what it returns.
"""

from __future__ import annotations

from influence_cli.app.session import (  # noqa: F401
    ModelState,
    Session,
    Shard,
    member_checkpoint,
    member_training_hash,
    ensemble_sessions,
)
from influence_cli.app.model import (  # noqa: F401
    ensure_model,
    checkpoint_problem,
    Member,
    ensure_members,
)
from influence_cli.app.factors import (  # noqa: F401
    is_out_of_memory,
    with_batch_backoff,
    shard_bounds,
    train_loader,
    influence_device,
    influence_dtype,
    stale_reason,
    FactorsState,
    ensure_factors,
    solver_options,
    existing_factors,
    warn_solver_limits,
    members_factors,
)
from influence_cli.app.scores import (  # noqa: F401
    self_influence_scores,
    SelfInfluenceResult,
    members_self_influence,
    members_probs,
    members_pairwise,
    TensorRows,
    predict_queries,
    run_self_influence,
    finish_self_influence,
    pairwise_block,
    merge_top,
    gather_scores,
)
from influence_cli.app.explain import (  # noqa: F401
    SCORE_COLUMNS,
    ScoreResult,
    score_rows,
    run_score,
)
from influence_cli.app.gate import (  # noqa: F401
    CheckOutcome,
    DEFAULT_MAX_FLAGGED_FRACTION,
    run_check,
    run_report,
)

__all__ = [
    "CheckOutcome",
    "DEFAULT_MAX_FLAGGED_FRACTION",
    "FactorsState",
    "Member",
    "ModelState",
    "SCORE_COLUMNS",
    "ScoreResult",
    "SelfInfluenceResult",
    "Session",
    "Shard",
    "TensorRows",
    "predict_queries",
    "checkpoint_problem",
    "ensemble_sessions",
    "ensure_factors",
    "ensure_members",
    "ensure_model",
    "existing_factors",
    "finish_self_influence",
    "gather_scores",
    "influence_device",
    "influence_dtype",
    "is_out_of_memory",
    "member_checkpoint",
    "member_training_hash",
    "members_factors",
    "members_pairwise",
    "members_probs",
    "members_self_influence",
    "merge_top",
    "pairwise_block",
    "run_check",
    "run_report",
    "run_score",
    "run_self_influence",
    "score_rows",
    "self_influence_scores",
    "shard_bounds",
    "solver_options",
    "stale_reason",
    "train_loader",
    "warn_solver_limits",
    "with_batch_backoff",
]
