#!/usr/bin/env python
"""Per-example mislabel terms of `infl evaluate --noise`'s noisy model, saved once per cell.

    python scripts/mislabel_study.py collect -c digits-mlp --kind uniform [--mem] [--set seed=1]
    python scripts/mislabel_study.py table runs/mislabel-study/*.npz

``collect`` builds the same noisy session as ``infl evaluate --noise 0.1 --kind K`` (the
same run directory, so the checkpoint and factors are shared with it), and for each
strategy (default exact and ekfac) saves the engine's terms A = gᵀPg, B = g'ᵀPg',
C = (g'−g)ᵀP(g'−g), ℓ, ℓ', y' with the flip mask and n to
runs/mislabel-study/<run>.npz. ``--mem`` is the memorising regime (300 epochs, no weight
decay, run name <config>-mem); single models (``influence.ensemble=1`` unless --set).
``table`` prints the AP of every score of
``audit.scores.SCORES`` and of the candidates below, per cell and strategy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

OUT = Path("runs/mislabel-study")


def collect(args: argparse.Namespace) -> None:
    from influence_cli.app import ensure_members, members_probs
    from influence_cli.app.factors import members_factors
    from influence_cli.app.scores import mislabel_terms_block
    from influence_cli.config import load_config
    from influence_cli.evaluation.detection import _noisy_session
    from influence_cli.progress import Reporter

    overrides = ["influence.ensemble=1"]  # the study is of single models (digits-mlp bundles 3)
    overrides += [f"name={args.config}-mem", "train.epochs=300", "train.weight_decay=0"] if args.mem else []
    overrides += list(args.set or [])  # after the regime's, so a --set name=... wins
    config = load_config(args.config, overrides)
    session = _noisy_session(config, args.fraction, args.kind, Reporter())
    members = ensure_members(session)
    data = session.data()
    member = members[0]
    out = {
        "flipped": data.noise.flipped.numpy().astype(bool),
        "labels": data.train.labels.numpy(),
        "original_labels": data.noise.original_labels.numpy(),
        "n": np.int64(len(data.train)),
    }
    for strategy in [] if args.probs_only else args.strategy or ["exact", "ekfac"]:
        fstate = members_factors(members, strategy, "self-influence")[0]
        terms = mislabel_terms_block(member.session, member.state.model, fstate.factors)
        for key, value in terms.items():
            out[f"{strategy}/{key}"] = value.double().numpy() if key != "alternative" else value.numpy()
    out["probs"] = members_probs(members, data.train)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{session.config.name}.npz"
    if args.probs_only:  # add the class probabilities to a saved cell (one forward pass)
        out = {**dict(np.load(path)), "probs": out["probs"]}
    np.savez(path, **out)
    print(path)


def candidates(t: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The audit.scores SCORES and the other candidates of the study (higher = suspicious).

    With m = ℓ − ℓ', d = gᵀP(g − g')/n (first-order LOO change of m) and h = A/n:
    ``loo_margin_sm_minus`` = m + d/(1 − h), the removal Sherman–Morrison with h_i ≈ g gᵀ
    (ill-posed where h ≥ 1, clipped); ``loo_loss_sm`` = ℓ + A/(n + A), the duplicate-row
    correction applied to the LOO loss; ``lin_loo_nll`` = log(e^ℓ + e^m(e^d − 1)), the
    cross-entropy after shifting the y' logit by d relative to y (other classes fixed),
    ``lin_loo_nll_sm`` the same with d/(1 + h); ``margin+t·d`` interpolates margin and
    loo_margin (a free coefficient t, chosen on digits-mlp only).
    """
    from influence_cli.audit.scores import mislabel_scores

    scores = mislabel_scores(t, n)
    a, b, c = (np.asarray(t[k], np.float64) for k in ("self_influence", "alternative_self_influence", "relabel_self_influence"))
    loss = np.asarray(t["loss"], np.float64)
    m = scores["margin"]
    d = (a - b + c) / (2.0 * n)
    h = a / n
    scores.update({
        "loo_margin_sm_minus": m + d / np.clip(1.0 - h, 1e-6, None),
        "loo_loss_sm": loss + a / (n + a),
        "lin_loo_nll": np.log(np.exp(loss) + np.exp(m) * np.expm1(d)),
        "lin_loo_nll_sm": np.log(np.exp(loss) + np.exp(m) * np.expm1(d / (1.0 + h))),
    })
    for t_ in (0.25, 0.5, 0.75):
        scores[f"margin+{t_:g}d"] = m + t_ * d
    if "probs" in t:
        scores["alo2_margin"] = m + alo2_margin_shift(t, n)
    return scores


def alo2_margin_shift(t: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Second-order (approximate leave-one-out, one Newton step with the row's own GGN
    curvature removed) change of the margin, the curvature restricted to the output-space
    plane S = span{u = p − e_y, w = e_y − e_y'} where A, B, C give the geometry.

    With U = [g, g' − g] = Jᵀ[u, w], the row's GGN term restricted to S is U G Uᵀ with
    G = (VᵀV)⁻¹VᵀΛV(VᵀV)⁻¹, V = [u, w], Λ = diag(p) − ppᵀ; Woodbury gives
    Δθ = (nK − U G Uᵀ)⁻¹ g = (nK)⁻¹U (I − G Q)⁻¹ e₁ with Q = Uᵀ(nK)⁻¹U = [[A, X], [X, C]]/n,
    X = gᵀP(g' − g) = (B − A − C)/2, and Δm = (g − g')ᵀΔθ = −e₂ᵀQ(I − GQ)⁻¹e₁
    (G = 0: the first-order d). Needs the class probabilities (``collect`` saves them).
    """
    a, b, c = (np.asarray(t[k], np.float64) for k in ("self_influence", "alternative_self_influence", "relabel_self_influence"))
    probs, rows = np.asarray(t["probs"], np.float64), np.arange(len(a))
    eye = np.eye(probs.shape[1])
    v = np.stack([probs - eye[t["labels"]], eye[t["labels"]] - eye[t["alternative"]]], 2)  # (N, K, 2)
    lam = probs[:, :, None] * eye[None] - probs[:, :, None] * probs[:, None, :]
    inv = np.linalg.pinv(np.einsum("nki,nkj->nij", v, v))
    g = inv @ np.einsum("nki,nkl,nlj->nij", v, lam, v) @ inv
    x = (b - a - c) / 2.0
    q = np.stack([np.stack([a, x], 1), np.stack([x, c], 1)], 1) / n
    e1 = np.zeros((len(rows), 2, 1))
    e1[:, 0] = 1.0
    solved = np.linalg.solve(np.eye(2)[None] - g @ q, e1)[..., 0]
    return -np.einsum("nj,nj->n", q[:, 1], solved)


def short(stem: str) -> str:
    """digits-mlp-mem-noise0.1-class_conditional → mlp-mem-cc (a column name)."""
    name = stem.replace("digits-", "").replace("-noise0.1", "")
    return name.replace("-class_conditional", "-cc").replace("-uniform", "-u")


def table(args: argparse.Namespace) -> None:
    """AP of every candidate per cell (the evaluate metric), its worst and mean gain over
    the training loss and in how many cells it is ≥ the loss, as a markdown table."""
    from influence_cli.evaluation.metrics import average_precision

    rows: dict[str, dict[str, float]] = {}
    for path in args.files:
        data = np.load(path)
        n, flipped = int(data["n"]), data["flipped"]
        strategies = sorted({k.split("/")[0] for k in data.files if "/" in k}, key=lambda s: s != "exact")
        for strategy in strategies:
            terms = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(strategy + "/")}
            if "probs" in data.files:
                terms.update(probs=data["probs"], labels=data["labels"])
            for name, values in candidates(terms, n).items():
                rows.setdefault(f"{strategy}:{name}", {})[short(Path(path).stem)] = average_precision(values, flipped)
    cells = sorted({c for r in rows.values() for c in r})
    loss = rows[next(k for k in rows if k.endswith(":loss"))]
    print("| score | " + " | ".join(cells) + " | cells ≥ loss | worst Δ | mean Δ |")
    print("|---|" + "---:|" * (len(cells) + 3))
    for name, r in rows.items():
        if name.endswith((":loss", ":margin")) and not name.startswith("exact:"):
            continue  # no curvature in them: the same for every strategy
        deltas = [r[c] - loss[c] for c in cells if c in r]
        wins = sum(x >= 0 for x in deltas)
        print(f"| {name} | " + " | ".join(f"{r[c]:.4f}" if c in r else "—" for c in cells)
              + f" | {wins}/{len(deltas)} | {min(deltas):+.4f} | {np.mean(deltas):+.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("collect")
    c.add_argument("-c", "--config", required=True)
    c.add_argument("--kind", default="uniform")
    c.add_argument("--fraction", type=float, default=0.1)
    c.add_argument("--mem", action="store_true")
    c.add_argument("-s", "--strategy", action="append")
    c.add_argument("--set", action="append")
    c.add_argument("--probs-only", action="store_true", help="only add the class probabilities to a saved cell")
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    args = parser.parse_args()
    collect(args) if args.what == "collect" else table(args)


if __name__ == "__main__":
    main()
