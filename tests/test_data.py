"""Data loading: every TRL layout, bad rows, truncation, collation, the shipped data."""

import json

import pytest
import torch

from icrm.config import DATA_DIR
from icrm.data import (
    IGNORE_INDEX, PreferenceDataset, collate_pairs, epoch_batches, normalize_row, read_rows,
)
from icrm.model import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_tokenizer_pad_differs_from_eos(tok):
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok("sort : 3 1 2", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(["sort", ":", "3", "1", "2"])


def test_explicit_prompt(tok):
    row = {"prompt": "sort : 3 1", "chosen": "1 3", "rejected": "3 1"}
    assert normalize_row(row, tok) == ("sort : 3 1", "1 3", "3 1", None)


def test_implicit_prompt_cut_at_word_boundary(tok):
    row = {"chosen": "sort : 3 1 20 -> 1 3 20", "rejected": "sort : 3 1 20 -> 1 3 2"}
    prompt, chosen, rejected, _ = normalize_row(row, tok)
    assert prompt == "sort : 3 1 20 -> 1 3 "
    assert (chosen, rejected) == ("20", "2")


def test_conversational_explicit_and_implicit_agree(tok):
    user = [{"role": "user", "content": "sort : 3 1"}]
    explicit = {"prompt": user, "chosen": [{"role": "assistant", "content": "1 3"}],
                "rejected": [{"role": "assistant", "content": "3 1"}]}
    implicit = {"chosen": user + explicit["chosen"], "rejected": user + explicit["rejected"]}
    a, b = normalize_row(explicit, tok), normalize_row(implicit, tok)
    assert a == b
    prompt, chosen, _, _ = a
    assert prompt == "<|user|> sort : 3 1 <|assistant|> "
    assert chosen.startswith("1 3")
    ds = PreferenceDataset([explicit], tok, 32)  # the template's EOS is not doubled
    assert tok.convert_ids_to_tokens(ds[0].chosen_ids[ds[0].chosen_prompt_len:]) == ["1", "3", "<eos>"]


def test_margin_column(tok):
    rows = [{"prompt": "sort : 2 1", "chosen": "1 2", "rejected": "2 1", "margin": 1.5}] * 2
    ds = PreferenceDataset(rows, tok, 16)
    batch = collate_pairs([ds[0], ds[1]], tok.pad_token_id)
    assert batch["margin"].tolist() == [1.5, 1.5]
    with pytest.raises(ValueError, match="margin column is set on some rows"):
        PreferenceDataset(rows + [{"prompt": "sort : 2 1", "chosen": "1 2", "rejected": "2 1"}], tok, 16)


def test_bad_rows_are_skipped_and_counted(tok, caplog):
    good = {"prompt": "sort : 2 1", "chosen": "1 2", "rejected": "2 1"}
    rows = [good, {"prompt": "x", "chosen": "1"}, {"prompt": "x", "chosen": "  ", "rejected": "1"},
            {"prompt": "x", "chosen": 3, "rejected": "1"}, "not a dict", good]
    with caplog.at_level("WARNING"):
        ds = PreferenceDataset(rows, tok, 16)
    assert len(ds) == 2 and ds.stats.bad == 4
    assert "missing field 'rejected'" in ds.stats.examples_of_bad[0]
    assert "empty chosen response" in ds.stats.examples_of_bad[1]
    assert "chosen must be a string" in ds.stats.examples_of_bad[2]
    assert "4 bad" in caplog.text


def test_all_bad_rows_fail_clearly(tok):
    with pytest.raises(ValueError, match="no usable preference rows"):
        PreferenceDataset([{"chosen": "1"}], tok, 16)


def test_invalid_jsonl_reports_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"chosen": "1", "rejected": "2"}\n\n{not json}\n')
    with pytest.raises(ValueError, match="line 3"):
        read_rows(str(path))


def test_json_and_parquet_files(tmp_path, tok):
    rows = [{"prompt": "sort : 2 1", "chosen": "1 2", "rejected": "2 1"}] * 3
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "d.parquet"))
    for name in ("d.json", "d.parquet"):
        assert len(PreferenceDataset(str(tmp_path / name), tok, 16)) == 3


def test_truncation_keeps_eos_or_drops(tok):
    rows = [
        {"prompt": "sort : 1 2 3\n", "chosen": "1 2 3", "rejected": "3 2 1"},  # 5 + 4 tokens
        {"prompt": "sort : 1 2 3 4\n", "chosen": "1", "rejected": "2"},  # prompt 6: no room for a token + EOS in 7
        {"prompt": "sort : 1\n", "chosen": "1", "rejected": "2"},  # fits
    ]
    ds = PreferenceDataset(rows, tok, 7)
    assert len(ds) == 2 and ds.stats.dropped_too_long == 1 and ds.stats.truncated == 1
    ex = ds[0]
    assert len(ex.chosen_ids) == 7 and ex.chosen_prompt_len == 5
    assert ex.chosen_ids == tok.convert_tokens_to_ids(["sort", ":", "1", "2", "3", "1", "<eos>"])  # cut, EOS put back
    assert ex.rejected_ids[-1] == tok.eos_token_id
    dropped = PreferenceDataset(rows, tok, 7, max_length_policy="drop")  # TRL's policy: any longer pair goes
    assert len(dropped) == 1 and dropped.stats.dropped_too_long == 2 and dropped.stats.truncated == 0
    assert dropped[0].chosen_ids == ds[1].chosen_ids


def test_json_lines_in_a_json_file(tmp_path, tok):
    """`datasets`' Dataset.to_json writes JSON Lines, even to a .json name."""
    from datasets import Dataset

    rows = [{"prompt": "sort : 2 1\n", "chosen": "1 2", "rejected": "2 1"}] * 3
    Dataset.from_list(rows).to_json(str(tmp_path / "d.json"))
    assert read_rows(str(tmp_path / "d.json")) == rows
    (tmp_path / "bad.json").write_text('{"chosen": "1"}\n{oops}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_rows(str(tmp_path / "bad.json"))


def test_shipped_prompts_survive_trl_concatenation(tok):
    """TRL's RewardTrainer tokenizes ``prompt + chosen + eos_token`` as one string (reward_trainer.py,
    "add_eos" then "explicit prompt case"): the shipped data must give the ids icrm trains on."""
    for split in ("train", "eval"):
        rows = read_rows(f"{DATA_DIR}/sort_{split}.jsonl")
        ds = PreferenceDataset(rows, tok, 64)
        assert len(ds) == len(rows)
        for row, ex in zip(rows, ds.examples):
            for side, ids in (("chosen", ex.chosen_ids), ("rejected", ex.rejected_ids)):
                assert tok(row["prompt"] + row[side] + tok.eos_token)["input_ids"] == ids
def test_collate_layout_and_pooling_position(tok):
    rows = [{"prompt": "sort : 2 1\n", "chosen": "1 2", "rejected": "2"},
            {"prompt": "sort : 4 3 5\n", "chosen": "3 4 5", "rejected": "5 4 3"}]
    ds = PreferenceDataset(rows, tok, 32)
    batch = collate_pairs([ds[0], ds[1]], tok.pad_token_id)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == (4, 9)  # chosen rows first, right padded to the longest
    assert ids[0].tolist()[:7] == tok.convert_tokens_to_ids(["sort", ":", "2", "1", "1", "2", "<eos>"])
    assert labels[0].tolist()[:4] == [IGNORE_INDEX] * 4 and labels[0, 4:7].tolist() == ids[0, 4:7].tolist()
    assert (labels[mask == 0] == IGNORE_INDEX).all() and (ids[mask == 0] == tok.pad_token_id).all()
    # The last label token is the rightmost non-pad token: the position HF's classifier reads.
    positions = torch.arange(ids.shape[1])
    last_label = torch.where(labels != IGNORE_INDEX, positions, -1).amax(1)
    hf_last = (positions * (ids != tok.pad_token_id)).argmax(1)
    assert torch.equal(last_label, hf_last)
    assert (ids[torch.arange(4), last_label] == tok.eos_token_id).all()


def test_epoch_batches_split_evenly_across_ranks():
    per_rank = [epoch_batches(11, 2, seed=0, epoch=1, rank=r, world_size=2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    seen = sorted(i for batches in per_rank for b in batches for i in b)
    assert set(seen) == set(range(11)) and len(seen) == 12  # one index repeated to even out
    assert epoch_batches(11, 2, seed=0, epoch=1) == epoch_batches(11, 2, seed=0, epoch=1)
    assert epoch_batches(11, 2, seed=0, epoch=1) != epoch_batches(11, 2, seed=0, epoch=2)


def test_shipped_data_is_clean_and_disjoint(tok):
    train = read_rows(f"{DATA_DIR}/sort_train.jsonl")
    held_out = read_rows(f"{DATA_DIR}/sort_eval.jsonl")
    assert len(train) >= 1000 and len(held_out) >= 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    ds = PreferenceDataset(held_out, tok, 64)
    assert ds.stats.kept == len(held_out) and ds.stats.truncated == 0
    assert tok.unk_token_id not in {i for e in ds.examples for i in e.chosen_ids + e.rejected_ids}
