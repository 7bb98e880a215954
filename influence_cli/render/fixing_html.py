"""fixing.html: the fixing curve of `infl evaluate --fix` as a self-contained page."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Mapping

from influence_cli.render.files import write_text
from influence_cli.render.lines import line_plot_svg


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


def fixing_plots(result: Mapping[str, Any]) -> str:
    """Two inline SVG line plots: flips found, and test accuracy (retrained / corrected)."""
    rankings = result["rankings"]
    found = {name: [(r["fraction"], r["flips_found"]) for r in rows] for name, rows in rankings.items()}
    accuracy: dict[str, list[tuple[float, Any]]] = {}
    for name, rows in rankings.items():
        accuracy[f"{name} retrained"] = [(r["fraction"], r["retrained_accuracy"]) for r in rows]
        accuracy[f"{name} corrected"] = [(r["fraction"], r["corrected_accuracy"]) for r in rows]
    ref = result["reference"]
    values = [v for pts in accuracy.values() for _x, v in pts if v is not None] + [ref["clean_accuracy"], ref["noisy_accuracy"]]
    lo, hi = min(values), max(values)
    pad = max(0.005, (hi - lo) * 0.1)
    first = line_plot_svg(found, title="flips found", xlabel="training data checked", ylabel="share of flips found",
                          y_range=(0.0, 1.0))
    second = line_plot_svg(accuracy, title="test accuracy", xlabel="training data checked", ylabel="test accuracy",
                           y_range=(lo - pad, hi + pad), height=max(280, 40 + 16 * len(accuracy)))
    return first + second


def fixing_html(result: Mapping[str, Any]) -> str:
    ref, cost = result["reference"], result["cost"]
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{_pct(r['fraction'])}</td><td>{_pct(r['flips_found'])}</td>"
        f"<td>{_pct(r['retrained_accuracy'])}</td><td>{_pct(r['corrected_accuracy'])}</td></tr>"
        for name, entries in result["rankings"].items() for r in entries
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(result['name'])}: fixing curve</title>"
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}td,th{padding:2px 10px;text-align:right}"
        "td:first-child{text-align:left}.plots{display:flex;flex-wrap:wrap}.plots svg{flex:1 1 460px}</style></head><body>"
        f"<h1>{escape(result['name'])}: fixing the data</h1>"
        f"<p>{escape(result['noise']['kind'])} noise on {_pct(result['noise']['fraction'])} of {result['examples']} "
        f"training labels. Clean accuracy {_pct(ref['clean_accuracy'])}, noisy {_pct(ref['noisy_accuracy'])}. "
        f"One correction {cost['correction_seconds']} s vs one retraining {cost['retraining_seconds']} s "
        f"(ratio {cost['ratio']}).</p><div class='plots'>{fixing_plots(result)}</div>"
        "<table><tr><th>ranking</th><th>checked</th><th>flips found</th><th>retrained</th><th>corrected</th></tr>"
        f"{rows}</table></body></html>\n"
    )


def write_fixing_html(result: Mapping[str, Any], path: Path) -> Path:
    return write_text(path, fixing_html(result))
