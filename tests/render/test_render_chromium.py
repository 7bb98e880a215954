"""Render the HTML report in headless Chromium and check the screenshot is a real page.

Skipped only when no chromium binary is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from influence_cli.audit.ranking import build_ranking, class_summary
from influence_cli.config import FlagConfig
from influence_cli.render.html import write_html_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def digits_report(path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    n = len(digits.target)
    labels = digits.target.copy()
    probs = rng.dirichlet(np.ones(10) * 0.3, n)
    scores = np.exp(rng.normal(size=n) * 1.5) * 100.0
    names = [str(c) for c in range(10)]
    flag = FlagConfig(rule="top_fraction", fraction=0.01, require_disagreement=False)  # top 18 flagged
    df = build_ranking(scores, labels, probs, [f"digits/{i:05d}.png" for i in range(n)], names, flag)
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    write_html_report(
        path, df, class_summary(df, names), title="digits <audit> & render test",
        display=lambda i: 255 - images[i], kind="image", top=48,
        meta={"dataset": "digits", "strategy": "ekfac", "examples": n, "time": "2025-01-01 00:00"},
    )
    return df


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    report = tmp_path / "report.html"
    df = digits_report(report)
    assert df["flagged"].sum() == 18
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,1600",
        report.resolve().as_uri(),
    ]
    env = dict(os.environ, HOME=str(tmp_path))
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert shot.exists(), f"no screenshot; exit {result.returncode}\n{result.stderr[-2000:]}"
    assert shot.stat().st_size > 10_000

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1600)
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 50, "the page rendered as (nearly) a single colour"
    # Flagged cards and histogram bars are drawn in the flag red (#c62828); it must be visible.
    red = (np.abs(pixels - np.array([0xC6, 0x28, 0x28])).sum(axis=1) < 40).sum()
    assert red > 500
    # Flagged cards have a pink background (#fff4f3, thumbnails #fbe3e1): the top cards are in view.
    pink = sum((np.abs(pixels - np.array(c)).sum(axis=1) < 12).sum() for c in ([0xFF, 0xF4, 0xF3], [0xFB, 0xE3, 0xE1]))
    assert pink > 20_000, "flagged cards are not visibly marked"
    # Text is rendered: a good share of dark pixels (not just backgrounds).
    assert (pixels.sum(axis=1) < 200).sum() > 2_000
