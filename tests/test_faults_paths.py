"""Paths with spaces and non-ASCII characters just work: image folders, manifests, tables,
the config file, output.dir and --out, end to end through the CLI."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import yaml
from PIL import Image

from fault_helpers import invoke

CLASSES = {"chat noir": (200, 40, 40), "hund ü 犬": (40, 200, 40)}


def make_images(folder):
    rng = random.Random(0)
    files = []
    for name, colour in CLASSES.items():
        (folder / "bilder" / name).mkdir(parents=True)
        for i in range(6):
            value = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in colour)
            path = folder / "bilder" / name / f"bild {i} é.png"
            Image.new("RGB", (4, 4), value).save(path)
            files.append((path.relative_to(folder).as_posix(), name))
    return files


@pytest.mark.parametrize("source", ["image_folder", "csv_manifest", "table"])
def test_spaces_and_non_ascii_paths(tmp_path, source):
    folder = tmp_path / "Daten ä 猫"
    folder.mkdir()
    if source == "table":
        rng = random.Random(1)
        frame = pd.DataFrame(
            {"größe": [rng.random() for _ in range(24)], "wert x": [rng.random() for _ in range(24)],
             "label": ["ja ✓" if i % 2 else "nein" for i in range(24)]}
        )
        frame.to_csv(folder / "tabelle ö.csv", index=False)
        data = {"source": "table", "path": "tabelle ö.csv", "test_fraction": 0.25}
    else:
        files = make_images(folder)
        if source == "csv_manifest":
            (folder / "liste ß.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in files), encoding="utf-8")
            data = {"source": "csv_manifest", "path": "liste ß.csv", "test_fraction": 0.34}
        else:
            data = {"source": "image_folder", "path": "bilder", "test_fraction": 0.34}
    config = folder / "konfig ä.yaml"
    config.write_text(
        yaml.safe_dump(
            {"name": "umlaut", "data": data, "model": {"arch": "mlp", "hidden_sizes": [4]},
             "train": {"epochs": 2, "batch_size": 8}, "output": {"dir": str(folder / "läufe x")}},
            allow_unicode=True,
        ),
        encoding="utf-8",
    )
    out = folder / "aus gabe ü" / "rangliste é.csv"
    result = invoke("self-influence", "-c", config, "--top", "3", "--out", out)
    assert result.exit_code == 0, result.output
    run = folder / "läufe x" / "umlaut"
    table = pd.read_csv(run / "self_influence.csv", keep_default_na=False)
    assert out.read_bytes() == (run / "self_influence.csv").read_bytes()
    names = set(table["label_name"])
    assert names <= ({"ja ✓", "nein"} if source == "table" else set(CLASSES))
    if source != "table":
        assert all(" é.png" in i for i in table["id"])
        queries = folder / "abfrage ü.csv"
        image = ("bilder/" if source == "image_folder" else "") + table["id"][0]  # ids are relative to the folder
        queries.write_text(f"path,label\n{image},{table['label_name'][0]}\n", encoding="utf-8")
        scored = invoke("score", queries, "-c", config, "--top", "2")
        assert scored.exit_code == 0, scored.output
        assert (run / "scores" / "abfrage ü.csv").is_file()
