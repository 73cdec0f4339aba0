"""Preference data: reading (JSONL/JSON/Parquet, every TRL layout), tokenizing, batching.

Layouts (as in TRL):

* explicit prompt: ``prompt``, ``chosen``, ``rejected`` strings;
* implicit prompt: ``chosen``, ``rejected`` only; their shared prefix (cut back to a word
  boundary) is the prompt;
* both again as chat-message lists (``[{"role": ..., "content": ...}]``), rendered with the
  tokenizer's chat template (implicit: the shared leading messages are the prompt);
* an optional numeric ``margin`` column (TRL: ``-logsigmoid(R_c - R_r - margin)``).

Tokenization: ``prompt + response`` as one text, as TRL does, then EOS (no second EOS when
the text already ends with it); labels -100 on the tokens that end inside the prompt. Pairs longer than ``max_length``
are, by ``max_length_policy``, either truncated (the response is cut and EOS put back as the
last token; a pair whose prompt leaves no room for a response token and EOS is dropped) or
dropped, as TRL does; both are counted and warned about. Bad rows (missing field, empty
response, wrong type) are skipped and counted, the first few listed; a file that is not valid
JSON(L) or not UTF-8 fails with the file name and line number. Pairs whose two sides are the
same token sequence (a tie: the Bradley-Terry loss is ln 2 whatever the model) and text the
tokenizer mostly maps to its unknown token are kept, with a warning that gives the counts.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch

from .io_safety import IcrmError, first_line

IGNORE_INDEX = -100
#: Warn when more than this share of a dataset's tokens are the tokenizer's unknown token.
UNK_WARN_SHARE = 0.05
log = logging.getLogger("icrm")


class BadRow(ValueError):
    """A preference row that cannot be used (the message says why)."""


@dataclass
class DataStats:
    rows: int = 0
    kept: int = 0
    bad: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    identical: int = 0
    merged: int = 0
    tokens: int = 0
    unknown_tokens: int = 0
    examples_of_bad: list[str] = field(default_factory=list)

    def note_bad(self, where: str, reason: str) -> None:
        self.bad += 1
        if len(self.examples_of_bad) < 5:
            self.examples_of_bad.append(f"{where}: {reason}")

    def summary(self) -> str:
        text = (f"{self.kept}/{self.rows} rows kept ({self.bad} bad, {self.dropped_too_long} dropped as longer than "
                f"max_length, {self.truncated} truncated to max_length)")
        if self.examples_of_bad:
            text += "; first bad rows: " + "; ".join(self.examples_of_bad)
        return text


# ------------------------------------------------------------------------------------------
# Reading files

def _decode(path: str, raw: bytes, start_line: int = 1) -> str:
    """UTF-8 text of ``raw`` (a BOM allowed); a bad byte is reported with its file and line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = start_line + raw.count(b"\n", 0, exc.start)
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise IcrmError(f"{path} is not UTF-8 text: line {line}, column {column}: byte 0x{raw[exc.start]:02x} "
                        f"({exc.reason}); re-save the file as UTF-8") from None


def read_rows(path: str) -> list[dict]:
    """Rows of a ``.jsonl`` / ``.json`` / ``.parquet`` file as dicts."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    if os.path.isdir(path):
        raise IcrmError(f"data file {path} is a folder; expected a .jsonl, .json or .parquet file")
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as exc:
            raise IcrmError(f"{path} is not a readable Parquet file ({first_line(exc)})") from None
    if lower.endswith(".json"):
        with open(path, "rb") as fh:
            text = _decode(path, fh.read())
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                raise ValueError(f"{path} is not valid JSON: line {exc.lineno}: {exc.msg}") from None
            return _json_lines(path, text.splitlines())  # `datasets`' to_json writes JSON Lines to .json files
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of rows (or {{'data': [...]}}), got {type(data).__name__}")
        return data
    with open(path, "rb") as fh:
        return _json_lines(path, (_decode(path, raw, lineno) for lineno, raw in enumerate(fh, start=1)))


def _json_lines(path: str, lines) -> list:
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSONL: line {lineno}: {exc.msg}") from None
    return rows


# ------------------------------------------------------------------------------------------
# Layout normalisation: row -> (prompt text, chosen text, rejected text, margin)

def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _common_prefix_at_word(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if n < min(len(a), len(b)) or len(a) != len(b):
        # Back up to a whitespace boundary so neither response starts mid-word.
        while n > 0 and not a[n - 1].isspace():
            n -= 1
    return a[:n]


def normalize_row(row, tokenizer) -> tuple[str, str, str, float | None]:
    """One raw row in any supported layout -> ``(prompt, chosen, rejected, margin)`` as text."""
    if not isinstance(row, dict):
        raise BadRow(f"row must be an object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise BadRow(f"missing field {key!r}")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise BadRow(f"margin must be a number, got {type(margin).__name__}")

    if _is_messages(chosen) or _is_messages(rejected):
        if not (_is_messages(chosen) and _is_messages(rejected)):
            raise BadRow("chosen and rejected must both be message lists or both strings")
        if prompt is None:
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif not _is_messages(prompt):
            raise BadRow(f"prompt must be a string or a message list, got {type(prompt).__name__}")
        for name, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not msgs or not all(isinstance(m["content"], str) and m["content"].strip() for m in msgs):
                raise BadRow(f"empty {name} response")
        if tokenizer.chat_template is None:
            raise BadRow("conversational row but the tokenizer has no chat template")
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if prompt else ""
        texts = []
        for msgs in (chosen, rejected):
            full = tokenizer.apply_chat_template(prompt + msgs, tokenize=False)
            if not full.startswith(prompt_text):
                raise BadRow("the chat template does not render prompt + response as prompt text + response text")
            texts.append(full[len(prompt_text):])
        return prompt_text, texts[0], texts[1], margin

    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise BadRow(f"{name} must be a string or a message list, got {type(value).__name__}")
    if prompt is None:
        prompt = _common_prefix_at_word(chosen, rejected)
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    elif not isinstance(prompt, str):
        raise BadRow(f"prompt must be a string, got {type(prompt).__name__}")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise BadRow(f"empty {name} response")
    return prompt, chosen, rejected, margin


# ------------------------------------------------------------------------------------------
# Tokenization

def encode_pair(prompt: str, response: str, tokenizer) -> tuple[list[int], int, list[tuple[int, int]]]:
    """``(input_ids, prompt_len, offsets)`` of ``prompt + response`` tokenized as ONE text, as TRL's
    ``RewardTrainer`` does (``tokenizer(prompt + response + eos_token)``), so a byte-level BPE merge
    across the boundary (a prompt ending with a space: ``'Ġ' + 'The'`` -> ``'ĠThe'``) gives the ids
    TRL and a Hugging Face classifier see. EOS is appended unless the text already ends with it
    (a tokenizer that appends EOS itself, as icrm's export does, gets no second one).

    ``prompt_len``: the tokens that end within the prompt text; a token that spans the prompt's
    end (``'ĠThe'``) belongs to the response, so the response keeps its first word.
    ``offsets``: each token's ``(start, end)`` character span in the joined text (``(0, 0)`` for
    special tokens), for callers that map words of the response to tokens.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"icrm tokenizes prompt + response as one text and needs a fast (tokenizers) tokenizer for "
                         f"its offsets, got {type(tokenizer).__name__}; load it with use_fast=True")
    encoded = tokenizer(prompt + response, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
        offsets.append((0, 0))
    prompt_len = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids) - 1)
    return ids, prompt_len, offsets


def merges_prompt_word(prompt: str, prompt_len: int, offsets: list[tuple[int, int]]) -> bool:
    """Whether the response's first token also holds the end of a prompt word (``'sort : 2 1' + '1 2'``
    reads ``... 2 11 2``): joined as text, as TRL does, the pair no longer means what its fields say."""
    return prompt_len < len(offsets) and offsets[prompt_len] != (0, 0) and \
        bool(prompt[offsets[prompt_len][0]:].strip())


def tokenize_pair(prompt: str, response: str, tokenizer, max_length: int,
                  policy: str = "truncate") -> tuple[list[int], int, bool, bool] | None:
    """-> ``(input_ids, prompt_len, truncated, merged)`` (see :func:`encode_pair`;
    ``merged``: :func:`merges_prompt_word`), or None when the sequence is dropped.

    Longer than ``max_length``: ``policy="truncate"`` cuts the response and puts EOS back as
    the last token (the reward is read there), None when not even one response token and EOS
    fit; ``"drop"``: None.
    """
    ids, prompt_len, offsets = encode_pair(prompt, response, tokenizer)
    merged = merges_prompt_word(prompt, prompt_len, offsets)
    if len(ids) <= max_length:
        return ids, prompt_len, False, merged
    if policy == "drop" or prompt_len + 2 > max_length:
        return None
    return ids[:max_length - 1] + [tokenizer.eos_token_id], prompt_len, True, merged


@dataclass
class PreferenceExample:
    chosen_ids: list[int]
    chosen_prompt_len: int
    rejected_ids: list[int]
    rejected_prompt_len: int
    margin: float | None = None


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized preference pairs, built from a file path or a list of raw rows."""

    def __init__(self, source, tokenizer, max_length: int, *, name: str = "data", max_length_policy: str = "truncate"):
        rows = read_rows(source) if isinstance(source, str) else list(source)
        self.stats = DataStats(rows=len(rows))
        self.examples: list[PreferenceExample] = []
        margins = []
        unk = tokenizer.unk_token_id
        for index, row in enumerate(rows):
            where = f"{name} row {index + 1}"
            try:
                prompt, chosen, rejected, margin = normalize_row(row, tokenizer)
            except BadRow as exc:
                self.stats.note_bad(where, str(exc))
                continue
            c = tokenize_pair(prompt, chosen, tokenizer, max_length, max_length_policy)
            r = tokenize_pair(prompt, rejected, tokenizer, max_length, max_length_policy)
            if c is None or r is None:
                self.stats.dropped_too_long += 1
                continue
            self.stats.truncated += int(c[2] or r[2])
            self.stats.merged += int(c[3] or r[3])
            self.stats.identical += int(c[0] == r[0])
            self.stats.tokens += len(c[0]) + len(r[0])
            self.stats.unknown_tokens += c[0].count(unk) + r[0].count(unk)
            self.examples.append(PreferenceExample(c[0], c[1], r[0], r[1], margin))
            margins.append(margin is not None)
        if any(margins) and not all(margins):
            raise ValueError(f"{name}: the margin column is set on some rows and missing on others")
        self.has_margin = bool(margins) and all(margins)
        self.stats.kept = len(self.examples)
        self.pad_token_id = tokenizer.pad_token_id
        if self.stats.bad or self.stats.dropped_too_long or self.stats.truncated:
            log.warning("%s: %s", name, self.stats.summary())
        if unk is not None and self.stats.unknown_tokens > UNK_WARN_SHARE * self.stats.tokens:
            log.warning("%s: %d of %d tokens (%.0f%%) are the unknown token %r: the tokenizer does not cover this "
                        "text (the built-in 'tiny' one knows only the sorting task's words); set model_name_or_path "
                        "/ tokenizer_name_or_path to a model made for it", name, self.stats.unknown_tokens,
                        self.stats.tokens, 100 * self.stats.unknown_tokens / max(1, self.stats.tokens), tokenizer.unk_token)
        if self.stats.merged:
            log.warning("%s: in %d of %d pairs the response's first token runs into the prompt's last word (prompt "
                        "and response are tokenized as one text, as TRL does): end each prompt with a space or "
                        "newline", name, self.stats.merged, self.stats.kept)
        if self.stats.identical:
            log.warning("%s: %d of %d pairs have chosen == rejected after tokenization: ties that teach nothing "
                        "(Bradley-Terry loss ln 2) and count as wrong in accuracy", name, self.stats.identical,
                        self.stats.kept)
        if not self.examples:
            raise ValueError(f"{name}: no usable preference rows ({self.stats.summary()})")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PreferenceExample:
        return self.examples[index]


def pad_rows(seqs: list[list[int]], prompt_lens: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids, attention_mask, labels [R, T]``."""
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, p : len(s)] = torch.tensor(s[p:])
        attention_mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pack_rows(seqs: list[list[int]], prompt_lens: list[int]) -> dict[str, torch.Tensor]:
    """Padding-free ``input_ids, position_ids, labels [1, N]`` and ``cu_seqlens [R + 1]``.

    ``position_ids`` restart at 0 for every sequence, which is how transformers' causal-mask
    builder recognises packed sequences (block-diagonal attention, no ``attention_mask``).
    """
    input_ids = torch.tensor([t for s in seqs for t in s])[None]
    labels = torch.tensor([t for s, p in zip(seqs, prompt_lens) for t in [IGNORE_INDEX] * p + s[p:]])[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    cu_seqlens = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "cu_seqlens": cu_seqlens}


def collate_pairs(examples: list[PreferenceExample], pad_token_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """B pairs -> ``input_ids, attention_mask, labels [2B, T]`` (chosen rows first), ``margin [B]`` if set.

    ``packed=True``: the padding-free form of :func:`_pack_rows` (chosen segments first).
    """
    seqs = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    plens = [e.chosen_prompt_len for e in examples] + [e.rejected_prompt_len for e in examples]
    batch = _pack_rows(seqs, plens) if packed else pad_rows(seqs, plens, pad_token_id)
    if examples[0].margin is not None:
        batch["margin"] = torch.tensor([float(e.margin) for e in examples])
    return batch


def collate_sft(examples: list[PreferenceExample], pad_token_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """SFT batches: the chosen rows only (padded, or packed with ``packed=True``)."""
    seqs, plens = [e.chosen_ids for e in examples], [e.chosen_prompt_len for e in examples]
    return _pack_rows(seqs, plens) if packed else pad_rows(seqs, plens, pad_token_id)


def epoch_batches(num_examples: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1, shuffle: bool = True) -> list[list[int]]:
    """This rank's batches of example indices for one epoch (deterministic in seed and epoch).

    Like ``DistributedSampler``: the permutation is padded to a multiple of ``world_size`` so
    every rank runs the same number of batches.
    """
    if shuffle:
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(num_examples, generator=gen).tolist()
    else:
        order = list(range(num_examples))
    extra = (-len(order)) % world_size
    order = order + order[:extra]
    mine = order[rank::world_size]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
