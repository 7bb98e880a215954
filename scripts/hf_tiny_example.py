"""The tiny Hugging Face example of the README: a randomly initialised BERT-like model,
its tokenizer and a sentence set with injected label flips, written to one folder.

    python scripts/hf_tiny_example.py make DIR      # tiny/ model folder, train.csv, test.csv, text.yaml
    infl self-influence -c DIR/text.yaml
    python scripts/hf_tiny_example.py measure DIR   # AP / AUROC of self-influence on the flips

No download: the vocabulary and the model config are written here (tests/hf/hf_helpers.py).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "hf"))

CONFIG = """name: tiny-text
data:
  source: hf_dataset
  train_path: train.csv
  test_path: test.csv
  id_column: id
  text_column: text
  label_column: label
  max_length: 16
model:
  arch: hf
  name_or_path: tiny
train:
  epochs: 20
  batch_size: 16
  lr: 0.003
  device: cpu
"""


def make(folder: Path) -> None:
    from hf_helpers import save_tiny_bert, write_text_csvs

    folder.mkdir(parents=True, exist_ok=True)
    save_tiny_bert(folder / "tiny")
    flips = write_text_csvs(folder, train=120, test=20, flips=12)
    (folder / "flips.json").write_text(json.dumps(flips))
    (folder / "text.yaml").write_text(CONFIG)
    print(f"{folder}: tiny/, train.csv (120 sentences, {len(flips)} labels flipped), test.csv, text.yaml")


def measure(folder: Path) -> None:
    from influence_cli.evaluation.metrics import auroc, average_precision

    flips = set(json.loads((folder / "flips.json").read_text()))
    with open(folder / "runs" / "tiny-text" / "self_influence.csv") as handle:
        rows = list(csv.DictReader(handle))
    scores = [float(r["self_influence"]) for r in rows]
    positives = [r["id"] in flips for r in rows]
    print(f"AP {average_precision(scores, positives):.3f}  AUROC {auroc(scores, positives):.3f}  "
          f"(chance AP {len(flips) / len(rows):.3f}, {len(rows)} examples)")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("make", "measure"):
        sys.exit(__doc__)
    (make if sys.argv[1] == "make" else measure)(Path(sys.argv[2]))
