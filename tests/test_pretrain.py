"""The pretrained tiny base: a deterministic pretraining, a corpus that avoids the shipped prompts, the shipped checkpoint."""

import json
import os

import pytest
import torch

from icrm import pretrain
from icrm.model import build_tiny_tokenizer, load_causal_lm


def test_corpus_is_seeded_and_avoids_the_excluded_prompts():
    first = pretrain.corpus(3, 50)
    assert first == pretrain.corpus(3, 50) and first != pretrain.corpus(4, 50)
    assert len({p for p, _ in first}) == 50
    excluded = {first[0][0], first[7][0]}
    assert not excluded & {p for p, _ in pretrain.corpus(3, 50, exclude=excluded)}


def test_pretraining_is_deterministic_for_a_seed(tmp_path):
    settings = dict(samples=64, steps=3, batch_size=8, learning_rate=1e-2, max_length=64)
    a, _, loss_a = pretrain.pretrain(seed=5, echo=None, **settings)
    b, _, loss_b = pretrain.pretrain(seed=5, echo=None, **settings)
    c, _, _ = pretrain.pretrain(seed=6, echo=None, **settings)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert loss_a == loss_b and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # Saved and loaded back: the same weights, a recorded checksum that matches the file.
    folder = pretrain.save_base(a, build_tiny_tokenizer(), str(tmp_path / "base"), {"seed": 5, **settings})
    record = json.loads((tmp_path / "base" / pretrain.SETTINGS_NAME).read_text())
    assert record["sha256"] == pretrain.weights_sha256(folder) and record["seed"] == 5
    loaded = load_causal_lm(folder, build_tiny_tokenizer()).state_dict()
    assert all(torch.equal(loaded[k], sa[k]) for k in sa)
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        pretrain.pretrain(seed=5, echo=None, **{**settings, "steps": 0})


def test_shipped_base_loads_and_reads_the_task():
    """The shipped base matches its recorded checksum and predicts the policy's next number far better
    than the random init it started from."""
    from icrm.data import pad_rows, tokenize_pair

    record = json.loads(open(os.path.join(pretrain.BASE_DIR, pretrain.SETTINGS_NAME)).read())
    assert record["sha256"] == pretrain.weights_sha256(pretrain.BASE_DIR)
    assert pretrain.base_model_path("tiny") == pretrain.BASE_DIR
    assert pretrain.base_model_path("some/folder") == "some/folder"
    tok = build_tiny_tokenizer()
    texts = pretrain.corpus(99, 32)
    encoded = [tokenize_pair(p, r, tok, 64) for p, r in texts]
    batch = pad_rows([e[0] for e in encoded], [e[1] for e in encoded], tok.pad_token_id)  # response tokens only
    losses = {}
    for name, source in (("base", pretrain.BASE_DIR), ("random", "tiny")):
        model = load_causal_lm(source, tok, seed=record["seed"]).eval()
        with torch.no_grad():
            losses[name] = float(model(**batch).loss)
    assert losses["base"] < 1.5 and losses["random"] > 4.0  # measured: 1.06 and about log(vocab) = 4.8
