"""Prompt + response tokenized as one text, as TRL and a Hugging Face classifier see it, with a
byte-level BPE tokenizer (where tokenizing the two apart gives other ids: ``'Ġ' | 'The'`` vs
``'ĠThe'``). The tokenizer is trained here, offline, on a few strings."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from icrm.cli import main
from icrm.data import PreferenceDataset, encode_pair
from icrm.model import RewardModel, save_reward_model

PROMPT = "Question: what colour is the sky? Answer: "  # ends with a space, as the docs recommend
CHOSEN, REJECTED = "The sky is blue.", "The sky is green."


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    texts = [PROMPT + CHOSEN, PROMPT + REJECTED, "The answer is The one. The sky, the sea."] * 20
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<pad>")


def trl_ids(tok, prompt, response):
    """TRL 1.16's RewardTrainer: EOS text appended, then prompt + response tokenized as one string."""
    return tok(prompt + response + tok.eos_token)["input_ids"]


def test_ids_are_trls_and_the_boundary_token_belongs_to_the_response(bpe):
    apart = bpe(PROMPT)["input_ids"] + bpe(CHOSEN)["input_ids"] + [bpe.eos_token_id]
    assert apart != trl_ids(bpe, PROMPT, CHOSEN)  # the case: the space merges into the response's first word
    ids, prompt_len, _ = encode_pair(PROMPT, CHOSEN, bpe)
    assert ids == trl_ids(bpe, PROMPT, CHOSEN)
    assert bpe.convert_ids_to_tokens(ids[prompt_len]) == "ĠThe"  # spans the prompt's end: a response token
    assert bpe.decode(ids[:prompt_len]) == PROMPT.rstrip(" ")
    example = PreferenceDataset([{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}], bpe, 64)[0]
    assert example.chosen_ids == trl_ids(bpe, PROMPT, CHOSEN) and example.chosen_prompt_len == prompt_len
    assert example.rejected_ids == trl_ids(bpe, PROMPT, REJECTED)


def test_a_prompt_running_into_the_response_is_warned_about(bpe, caplog):
    PreferenceDataset([{"prompt": "Answer:", "chosen": "The sky", "rejected": "Theo"}], bpe, 64)
    assert "response's first token runs into the prompt's last word" not in caplog.text  # ':' + 'The' stay apart
    PreferenceDataset([{"prompt": "Answer: Th", "chosen": "e sky", "rejected": "eo"}], bpe, 64)
    assert "in 1 of 1 pairs the response's first token runs into the prompt's last word" in caplog.text


def test_exported_scores_equal_icrm_score(bpe, tmp_path):
    config = LlamaConfig(vocab_size=len(bpe), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=bpe.pad_token_id, eos_token_id=bpe.eos_token_id, bos_token_id=None)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    rm = RewardModel(AutoModelForCausalLM.from_config(config), with_lm_head=False, backend="reference")
    with torch.no_grad():
        rm.score.weight.normal_()
    save_reward_model(rm, bpe, str(tmp_path / "rm"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": PROMPT, "response": CHOSEN}) + "\n"
                    + json.dumps({"prompt": PROMPT, "response": REJECTED}) + "\n")
    assert main(["score", "--model", str(tmp_path / "rm"), "--input", str(rows), "--output", str(tmp_path / "s.jsonl"),
                 "--kernels", "reference"]) == 0
    icrm_scores = [json.loads(line)["response_reward"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert main(["export", "--model", str(tmp_path / "rm"), "--output", str(tmp_path / "hf")]) == 0
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        hf_scores = [float(hf(**hf_tok(PROMPT + r, return_tensors="pt")).logits[0, 0]) for r in (CHOSEN, REJECTED)]
    assert hf_scores == pytest.approx(icrm_scores, abs=1e-5)
