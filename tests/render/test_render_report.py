"""CSV/JSON writers, rich tables and the HTML report (influence_cli.render)."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from rich.console import Console

from influence_cli.audit.ranking import SELF_INFLUENCE_COLUMNS, build_ranking, class_summary
from influence_cli.config import FlagConfig
from influence_cli.render import html as html_report
from influence_cli.render.files import read_ranking_csv, write_csv, write_json
from influence_cli.render.format import format_prob, format_score
from influence_cli.render.html import write_html_report
from influence_cli.render.tables import render_class_summary, render_self_influence_table

EVIL_CLASS = "<script>alert(1)</script>"
EVIL_ID = 'pic "quoted" & <b>bold</b>.png'


def make_audit(n=30, k=4, seed=0, names=None, ids=None, flag=None, scores=None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k) * 0.5, n)
    s = np.exp(rng.normal(size=n) * 2) * 100 if scores is None else np.asarray(scores, dtype=float)
    names = names or [f"class{i}" for i in range(k)]
    ids = ids or [f"img/{i:04d}.png" for i in range(n)]
    flag = flag or FlagConfig(rule="top_fraction", fraction=0.3)
    df = build_ranking(s, labels, probs, ids, names, flag)
    return df, class_summary(df, names), names


def image_display(i: int) -> np.ndarray:
    return ((np.arange(64).reshape(8, 8) * 4 + i) % 256).astype(np.uint8)


# ----------------------------------------------------------------------------- CSV / JSON


def test_csv_round_trip_exact(tmp_path):
    ids = ["NA", "001", "a,b", 'quote"d', "null", "x\ny", "[bold]", "ünï"] + [f"r{i}" for i in range(22)]
    df, _, _ = make_audit(ids=ids)
    df.loc[0, "self_influence"] = 0.1 + 0.2  # needs 17 digits to round-trip
    path = write_csv(df, tmp_path / "self_influence.csv")
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == ",".join(SELF_INFLUENCE_COLUMNS)  # no index column
    assert ",True," in text and ",False," in text
    back = read_ranking_csv(path)
    assert list(back.columns) == SELF_INFLUENCE_COLUMNS
    assert back["id"].tolist() == df["id"].tolist()
    assert back["suggested_label"].tolist() == df["suggested_label"].tolist()
    assert back["flagged"].dtype == bool
    assert back["flagged"].tolist() == df["flagged"].tolist()
    for column in ("label_prob", "loss", "self_influence"):
        assert back[column].to_numpy().tobytes() == df[column].to_numpy().tobytes(), column
    for column in ("rank", "index", "label", "predicted"):
        assert back[column].tolist() == df[column].tolist()


def test_csv_write_is_atomic(tmp_path, monkeypatch):
    df, _, _ = make_audit()
    path = tmp_path / "out" / "self_influence.csv"
    write_csv(df, path)  # creates the folder
    before = path.read_bytes()

    def broken_to_csv(self, handle, **kwargs):
        handle.write("rank,index\n1,")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken_to_csv)
    with pytest.raises(RuntimeError):
        write_csv(df, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["self_influence.csv"]


def test_written_files_are_not_private(tmp_path):
    df, summary, _ = make_audit()
    csv_path = write_csv(df, tmp_path / "a.csv")
    json_path = write_json(summary, tmp_path / "a.json")
    for path in (csv_path, json_path):
        assert path.stat().st_mode & 0o044  # mkstemp's 0600 must not leak through


def test_write_json_numpy_and_non_finite(tmp_path):
    obj = {"a": np.int64(3), "b": np.float32(0.5), "c": np.arange(3), "d": float("nan"), "e": [np.bool_(True)]}
    path = write_json(obj, tmp_path / "x.json")
    assert json.loads(path.read_text()) == {"a": 3, "b": 0.5, "c": [0, 1, 2], "d": None, "e": [True]}
    assert path.read_text().startswith("{\n  ")


def test_formatting_helpers():
    assert format_score(1234.5) == "1.23e+03"
    assert format_score(0.000123456) == "1.23e-04"
    assert format_prob(0.123) == "12.3%"
    assert format_prob(1e-6) == "<0.1%"
    assert format_prob(0.0) == "0.0%"


# ----------------------------------------------------------------------------- rich tables


def test_rich_table_shows_top_ids_and_arrow_for_flagged():
    ids = ["[bold]evil[/bold]", "[/]", "a/" * 60 + "deep_file.png"] + [f"row-{i}" for i in range(27)]
    scores = np.r_[[1e6, 9e5, 8e5], np.linspace(1.0, 100.0, 27)]  # the odd ids rank 1-3
    df, summary, _ = make_audit(ids=ids, scores=scores)
    assert df["id"].tolist()[:3] == ids[:3]
    console = Console(record=True, width=120)
    render_self_influence_table(df, 10, console, title="Top [red]suspects[/red]")
    render_class_summary(summary, console)
    text = console.export_text()

    for row in df.head(10).to_dict("records"):
        shown = row["id"] if len(row["id"]) < 40 else row["id"][-20:]
        assert shown in text, row["id"]
        if row["flagged"]:
            assert f"{row['label_name']} → {row['suggested_label']}" in text
    assert "Top [red]suspects[/red]" in text  # the title is escaped too
    assert "…" in text  # the long path is shortened
    assert "[bold]evil[/bold]" in text and "deep_file.png" in text
    caption = f"{int(df['flagged'].sum())} of {len(df)} training examples flagged"
    assert caption in text
    table_text = text.split(caption)[0]  # rows of the first table only
    lines = {line.split()[0]: line for line in table_text.splitlines() if line.strip() and line.split()[0].isdigit()}
    assert len(lines) == 10
    assert "P(given)" in text and "Self-influence" in text and "Flag" in text  # headers not truncated
    for row in df.head(10).to_dict("records"):
        line = lines[str(row["rank"])]
        assert ("→" in line) == bool(row["flagged"])
        assert ("⚑" in line) == bool(row["flagged"])
    assert "Flagged per class" in text
    first = summary["pairs"][0]
    assert re.search(rf"{first['given']}\s+→\s+{first['suggested']}\s+{first['count']}", text)


def test_rich_table_markup_in_every_row():
    # Every id and class name carries markup; if one were parsed, its text would vanish or rich would raise.
    names = ["[bold]zero", "[/]", "[link=x]two[/link]"]
    ids = [f"[bold]id{i}[/bold]" for i in range(12)]
    df, summary, _ = make_audit(n=12, k=3, names=names, ids=ids, flag=FlagConfig(rule="top_fraction", fraction=1.0,
                                                                              require_disagreement=False))
    console = Console(record=True, width=120)
    render_self_influence_table(df, 12, console, title="t")
    render_class_summary(summary, console)
    text = console.export_text()
    for i in range(12):
        assert f"[bold]id{i}[/bold]" in text
    assert "[link=x]two[/link]" in text and "[bold]zero" in text


def test_rich_class_summary_without_flags():
    df, summary, _ = make_audit(flag=FlagConfig(rule="mad", k=1e6))
    console = Console(record=True, width=100)
    render_class_summary(summary, console)
    assert "No training examples flagged" in console.export_text()


# ----------------------------------------------------------------------------- HTML


def test_html_escapes_user_strings(tmp_path):
    names = [EVIL_CLASS, "dog", "bird"]
    ids = [EVIL_ID] * 1 + [f"id{i}" for i in range(19)]
    # Everything flagged and shown, so both the id and the class name reach the cards.
    flag = FlagConfig(rule="top_fraction", fraction=1.0, require_disagreement=False)
    df, summary, _ = make_audit(n=20, k=3, names=names, ids=ids, flag=flag)
    path = write_html_report(
        tmp_path / "report.html", df, summary, title="Audit <i>x</i>", display=image_display, kind="image",
        top=20, meta={"dataset": "<img src=x onerror=alert(2)>", "path": "/data/a&b"},
    )
    html_text = path.read_text(encoding="utf-8")
    assert "<script>alert" not in html_text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    assert 'pic "quoted"' not in html_text and "<b>bold</b>" not in html_text
    assert "pic &quot;quoted&quot; &amp; &lt;b&gt;bold&lt;/b&gt;.png" in html_text
    assert "<img src=x" not in html_text and "&lt;img src=x onerror=alert(2)&gt;" in html_text
    assert "/data/a&amp;b" in html_text
    assert "<i>x</i>" not in html_text
    assert "<script" not in html_text.lower()


@pytest.mark.parametrize("top", [5, 50])
def test_html_image_kind_one_img_per_card_and_offline(tmp_path, top):
    df, summary, _ = make_audit(n=30)
    path = write_html_report(tmp_path / "r.html", df, summary, title="t", display=image_display, kind="image",
                             top=top, meta={"dataset": "digits"})
    text = path.read_text(encoding="utf-8")
    assert text.count("<img") == min(top, 30)
    assert text.count('<article class="card') == min(top, 30)
    assert text.count('<article class="card flagged"') == int(df.head(top)["flagged"].sum())
    assert "http://" not in text and "https://" not in text
    assert "<svg" in text and "self-influence (log scale)" in text
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(uris) == min(top, 30)
    thumb = Image.open(io.BytesIO(base64.b64decode(uris[0])))
    assert min(thumb.size) >= 96
    # nearest-neighbour: the upscaled 8x8 picture still has at most 64 distinct values
    assert len(set(np.asarray(thumb).reshape(-1).tolist())) <= 64


def test_html_image_kind_accepts_rgb_and_survives_a_broken_preview(tmp_path):
    df, summary, _ = make_audit(n=6)

    def display(i):
        if i == int(df["index"].iloc[0]):
            raise OSError("file vanished")
        return np.random.default_rng(i).integers(0, 255, (40, 30, 3), dtype=np.uint8)

    text = write_html_report(tmp_path / "r.html", df, summary, title="t", display=display, kind="image",
                             top=6, meta={}).read_text(encoding="utf-8")
    assert text.count("<img") == 5
    assert "preview unavailable" in text and "file vanished" in text


def test_html_table_kind_shows_feature_values(tmp_path):
    df, summary, _ = make_audit(n=10)

    def display(i):
        return {"sepal_length": 5.1 + i, "species_code": i, "note": "<raw>", **{f"f{j}": j for j in range(20)}}

    text = write_html_report(tmp_path / "t.html", df, summary, title="t", display=display, kind="table",
                             top=10, meta={}).read_text(encoding="utf-8")
    assert "<img" not in text
    first = int(df["index"].iloc[0])
    assert "sepal_length" in text and f"{5.1 + first:.4g}" in text
    assert "&lt;raw&gt;" in text and "<raw>" not in text
    assert "+ 11 more" in text  # 23 features, 12 shown
    assert "f8" in text and ">f9<" not in text


def test_html_vector_kind_arrays(tmp_path):
    df, summary, _ = make_audit(n=4)
    text = write_html_report(tmp_path / "v.html", df, summary, title="t",
                             display=lambda i: np.arange(5) * 0.5 + i, kind="vector", top=4,
                             meta={}).read_text(encoding="utf-8")
    assert "x[4]" in text and "<img" not in text


def test_histogram_handles_degenerate_scores(tmp_path):
    labels = np.zeros(5, dtype=int)
    probs = np.tile([0.5, 0.5], (5, 1))
    for s in (np.zeros(5), np.full(5, 3.0), np.array([0.0, 1.0, 0.0, 2.0, 0.0])):
        df = build_ranking(s, labels, probs, list("abcde"), ["a", "b"])
        text = write_html_report(tmp_path / "h.html", df, class_summary(df, ["a", "b"]), title="t",
                                 display=image_display, kind="image", meta={}).read_text(encoding="utf-8")
        svg = re.search(r"<svg.*?</svg>", text, re.S).group(0)
        assert not re.search(r"\b(nan|inf)\b", svg, re.I), svg
        if not (s > 0).any():
            assert "no positive self-influence values" in text
        elif (s <= 0).any():
            assert f"{int((s <= 0).sum())} examples with self-influence ≤ 0 are not shown" in text


def test_html_written_atomically(tmp_path):
    df, summary, _ = make_audit(n=5)
    with pytest.raises(ValueError):
        write_html_report(tmp_path / "r.html", df, summary, title="t", display=image_display, kind="audio", meta={})
    assert list(tmp_path.iterdir()) == []
    write_html_report(tmp_path / "r.html", df, summary, title="t", display=image_display, kind="image", meta={})
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_image_conversion_of_other_dtypes():
    for image in (np.random.default_rng(0).random((8, 8)),               # floats in [0, 1]
                  np.random.default_rng(0).normal(size=(3, 10, 10)),     # channels-first, any range
                  np.ones((12, 12, 1), dtype=np.int64) * 200,            # 0..255 integers
                  np.zeros((8, 8), dtype=bool)):
        uri = html_report.image_to_png_data_uri(image)
        img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert min(img.size) >= 96
    big = html_report.image_to_png_data_uri(np.zeros((600, 900, 3), dtype=np.uint8))
    assert max(Image.open(io.BytesIO(base64.b64decode(big.split(",", 1)[1]))).size) <= 256
    with pytest.raises(ValueError):
        html_report.image_to_png_data_uri(np.zeros((2, 3, 5, 7)))
