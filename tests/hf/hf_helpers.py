"""A tiny randomly initialised BERT classifier and a sentiment-like text set (no download).

The vocabulary is written here; the model is built from a config and saved with
save_pretrained next to its tokenizer, the way a user's fine-tuned folder looks.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

POSITIVE = ["good", "great", "fine", "nice", "happy", "lovely", "superb", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "sad", "terrible", "boring", "dreadful", "weak"]
FILLER = ["the", "a", "movie", "film", "was", "is", "very", "quite", "plot", "acting", "story", "and", "it", "this", "really"]


def save_tiny_bert(folder: Path, num_labels: int = 2, seed: int = 0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *POSITIVE, *NEGATIVE]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentences(n: int, seed: int) -> list[tuple[str, str]]:
    """(text, label) pairs: filler words around one or two words of the label's class."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))]
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        out.append((" ".join(words), label))
    return out


def write_text_csvs(folder: Path, train: int = 60, test: int = 20, flips: int = 8, seed: int = 0) -> list[str]:
    """train.csv (with ``flips`` labels swapped) and test.csv; returns the flipped ids."""
    rng = random.Random(seed + 1)
    rows = sentences(train, seed)
    flipped = set(rng.sample(range(train), flips))
    with open(folder / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "label"])
        for i, (text, label) in enumerate(rows):
            if i in flipped:
                label = "neg" if label == "pos" else "pos"
            writer.writerow([f"s{i}", text, label])
    with open(folder / "test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "label"])
        for i, (text, label) in enumerate(sentences(test, seed + 7)):
            writer.writerow([f"t{i}", text, label])
    return [f"s{i}" for i in sorted(flipped)]
