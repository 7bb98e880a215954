"""EK-FAC factors of a tiny BERT's sequence Linear layers against dense references.

float64; the references run every sentence alone, cut to its real length (no padding),
with autograd's own per-example weight gradients (tests/engine/sequence_reference.py).
"""

from __future__ import annotations

import pytest
import sequence_reference as dense
import torch
from hf_helpers import save_tiny_bert, sentences

from influence_cli import engine
from influence_cli.hf import PackedTextClassifier, default_modules

pytestmark = pytest.mark.filterwarnings("ignore:influence. parameters of these modules are not tracked")
F64 = torch.float64
TOL = 1e-5
LAYERS = [
    "bert.encoder.layer.1.attention.self.value",
    "bert.encoder.layer.1.intermediate.dense",
    "bert.encoder.layer.0.attention.self.query",
    "classifier",
]


def tokenised(tokenizer, n, seed, length=14):
    rows = sentences(n, seed)
    enc = tokenizer([t for t, _ in rows], padding="max_length", max_length=length, return_tensors="pt")
    labels = torch.tensor([0 if lab == "pos" else 1 for _, lab in rows])
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], labels


def test_tiny_bert_factors_and_scores_match_dense_reference(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = save_tiny_bert(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True).to(F64).eval()
    ids, mask, types, labels = tokenised(tokenizer, 14, seed=0)
    assert int(mask.sum()) < mask.numel()  # there is padding
    loader = [
        {"input_ids": ids[s : s + 5], "attention_mask": mask[s : s + 5], "token_type_ids": types[s : s + 5],
         "labels": labels[s : s + 5]}
        for s in range(0, 14, 5)
    ]
    examples = dense.unpadded_examples(ids, mask, labels, {"token_type_ids": types})
    ref = dense.reference_factors(model, examples, LAYERS)
    cov_a, cov_s = engine.covariance_sums(model, loader, fisher="empirical", modules=LAYERS).normalised()
    factors = engine.fit_factors(model, loader, "ekfac", fisher="empirical", modules=LAYERS, dtype=F64)
    for name in LAYERS:
        a_ref, s_ref, grads = ref[name]
        assert dense.rel_err(cov_a[name], a_ref) < TOL, name
        assert dense.rel_err(cov_s[name], s_ref) < TOL, name
        layer = factors.layers[name]
        assert dense.rel_err(layer.eigenvalues, (layer.q_s.T @ grads @ layer.q_a).square().mean(0)) < TOL, name
    assert torch.linalg.matrix_rank(ref[LAYERS[0]][2][0]) > 1  # Σ_t g_t a_tᵀ is not rank one

    grads_by_layer = {n: ref[n][2] for n in LAYERS}
    assert dense.rel_err(engine.self_influence(model, factors, loader), dense.reference_scores(factors, grads_by_layer)) < TOL
    t_ids, t_mask, t_types, t_labels = tokenised(tokenizer, 4, seed=5)
    test_ref = dense.reference_factors(model, dense.unpadded_examples(t_ids, t_mask, t_labels, {"token_type_ids": t_types}), LAYERS)
    pair = engine.pairwise_scores(
        model, factors, loader, {"input_ids": t_ids, "attention_mask": t_mask, "token_type_ids": t_types}, t_labels
    )
    assert dense.rel_err(pair, dense.reference_scores(factors, grads_by_layer, {n: test_ref[n][2] for n in LAYERS})) < TOL


def test_packed_wrapper_default_modules(tmp_path):
    from transformers import AutoModelForSequenceClassification

    folder = save_tiny_bert(tmp_path / "tiny")
    wrapped = PackedTextClassifier(AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True))
    chosen = default_modules(wrapped, last_blocks=1)
    assert "model.classifier" in chosen
    assert all(".layer.0." not in n for n in chosen)
    assert sum(".layer.1." in n for n in chosen) == 6  # query, key, value, attention out, intermediate, output
    assert len(wrapped.influence_modules) == 13  # last 2 blocks × 6 + classifier
