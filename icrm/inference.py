"""Scoring saved reward models: ``icrm eval``, ``icrm score`` and the process metrics all read
rewards through :func:`token_rewards` (prompt + response tokenized as one text, as TRL does,
EOS appended, right-padded batches, per-token rewards back per item)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import BadRow, normalize_row, pad_rows, read_rows, tokenize_pair
from .io_safety import atomic_path, refuse_same_file


@dataclass
class Scored:
    """One scored ``(prompt, response)``: its ids, where the response starts, whether it was
    truncated to ``max_length``, and the reward at every position (``rewards[-1]``: at EOS)."""

    ids: list[int]
    prompt_len: int
    truncated: bool
    rewards: np.ndarray


@torch.no_grad()
def token_rewards(rm, tokenizer, items: list[tuple[str, str]], *, max_length: int, batch_size: int = 64,
                  progress=None) -> list[Scored | None]:
    """Per ``(prompt, response)``: :class:`Scored`, or None where the prompt leaves no room for a
    response token and EOS within ``max_length``. ``progress``: a tqdm bar advanced per item."""
    device = next(rm.parameters()).device
    was_training = rm.training
    rm.eval()
    out: list[Scored | None] = []
    for start in range(0, len(items), batch_size):
        encoded = [tokenize_pair(prompt, response, tokenizer, max_length) for prompt, response in
                   items[start:start + batch_size]]
        kept = [e for e in encoded if e is not None]
        rewards = None
        if kept:
            batch = pad_rows([e[0] for e in kept], [e[1] for e in kept], tokenizer.pad_token_id)
            rewards, _ = rm(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            rewards = rewards.float().cpu().numpy()
        row = 0
        for e in encoded:
            if e is None:
                out.append(None)
                continue
            ids, prompt_len, truncated, _ = e
            out.append(Scored(ids, prompt_len, truncated, rewards[row, :len(ids)]))
            row += 1
        if progress is not None:
            progress.update(len(encoded))
    rm.train(was_training)
    return out


def progress_bar(total: int, desc: str, disable: bool):
    """tqdm on stderr; off with ``disable`` (transformers' ``disable_tqdm``) and when stderr is not a terminal."""
    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, disable=True if disable else None,
                dynamic_ncols=True)


def done_line(text: str, start: float) -> None:
    """The completion line of ``icrm eval`` / ``score`` (stderr: stdout may carry the results)."""
    print(f"icrm: {text} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def evaluate_file(model_dir: str, eval_file: str, *, max_length: int, batch_size: int = 64, backend: str = "auto",
                  bon_file: str | None = None, disable_tqdm: bool = False) -> dict:
    """Pairwise accuracy, mean margin, BT (+ SFT) loss and per-token reward statistics of a saved RM;
    with prefix values in ``eval_file`` also the process metrics, with ``bon_file`` best-of-N
    (:mod:`icrm.metrics`; those keys carry no ``eval_`` prefix)."""
    from .config import RewardConfig
    from .metrics import best_of_n, evaluate_process, has_prefix_values
    from .model import load_reward_model
    from .trainers import RewardTrainer

    start = time.perf_counter()
    rows = read_rows(eval_file)  # a missing or malformed file fails here, before the model loads
    rm, tokenizer = load_reward_model(model_dir, backend=backend)
    args = RewardConfig(model_name_or_path=model_dir, train_file=eval_file, eval_file=eval_file,
                        max_length=max_length, reg_ratio=0.0, sft_regularizer=rm.lm_head is not None,
                        per_device_eval_batch_size=batch_size, kernels=backend,
                        output_dir=os.path.join(model_dir, "eval"))
    trainer = RewardTrainer(model=rm, args=args, eval_dataset=rows, processing_class=tokenizer)
    result = trainer.evaluate()
    if has_prefix_values(rows):
        with progress_bar(2 * len(rows), "process metrics", disable_tqdm) as bar:
            result.update(evaluate_process(trainer.model, tokenizer, rows, max_length=max_length,
                                           batch_size=batch_size, progress=bar))
    if bon_file:
        groups = read_rows(bon_file)
        with progress_bar(sum(len(g["responses"]) for g in groups), "best-of-n", disable_tqdm) as bar:
            result.update(best_of_n(trainer.model, tokenizer, groups, max_length=max_length,
                                    batch_size=batch_size, progress=bar))
    done_line(f"evaluated {len(trainer.eval_dataset)} pairs of {eval_file}" + (f" and {bon_file}" if bon_file else ""),
              start)
    return result


def _score_inputs(row, tokenizer) -> list[tuple[str, str, str]]:
    """``[(name, prompt text, response text)]`` of one ``icrm score`` input row."""
    if isinstance(row, dict) and "response" in row:
        if not isinstance(row.get("prompt", ""), str) or not isinstance(row["response"], str) or not row["response"].strip():
            raise BadRow("'prompt' must be a string and 'response' a non-empty string")
        return [("response", row.get("prompt", ""), row["response"])]
    if isinstance(row, dict) and "messages" in row:
        msgs = row["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise BadRow("'messages' must end with an assistant message")
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        return [("response", prompt, full[len(prompt):])]
    prompt, chosen, rejected, _ = normalize_row(row, tokenizer)
    return [("chosen", prompt, chosen), ("rejected", prompt, rejected)]


def score_file(model_dir: str, input_file: str, output_file: str = "-", *, max_length: int, backend: str = "auto",
               batch_size: int = 64, disable_tqdm: bool = False) -> int:
    """Write one JSON line per input row: ``<name>_reward``, ``<name>_token_rewards`` and
    ``<name>_tokens`` (response tokens, EOS included), or ``error``. Returns the rows written."""
    from .model import load_reward_model

    start = time.perf_counter()
    refuse_same_file(input_file, output_file)
    rows = read_rows(input_file)  # a missing or malformed input fails here, before any output exists
    rm, tokenizer = load_reward_model(model_dir, backend=backend)
    written = 0
    with contextlib.ExitStack() as stack:
        if output_file == "-":
            out = sys.stdout
        else:  # written beside the target, renamed into place only when every row is done
            out = stack.enter_context(open(stack.enter_context(atomic_path(output_file)), "w"))
        bar = stack.enter_context(progress_bar(len(rows), "icrm score", disable_tqdm))
        for first in range(0, len(rows), batch_size):
            records, parts = [], []
            for index in range(first, min(first + batch_size, len(rows))):
                records.append({"index": index})
                try:
                    parts += [(len(records) - 1, part) for part in _score_inputs(rows[index], tokenizer)]
                except BadRow as exc:
                    records[-1]["error"] = str(exc)
            scored = token_rewards(rm, tokenizer, [(prompt, response) for _, (_, prompt, response) in parts],
                                   max_length=max_length, batch_size=batch_size)
            for (at, (name, _, _)), item in zip(parts, scored):
                if item is None:
                    records[at]["error"] = f"prompt does not fit max_length={max_length}"
                    continue
                token_rewards_of_response = item.rewards[item.prompt_len:].tolist()
                records[at][f"{name}_reward"] = token_rewards_of_response[-1]
                records[at][f"{name}_token_rewards"] = token_rewards_of_response
                records[at][f"{name}_tokens"] = tokenizer.convert_ids_to_tokens(item.ids[item.prompt_len:])
            out.writelines(json.dumps(record) + "\n" for record in records)
            written += len(records)
            bar.update(len(records))
    done_line(f"scored {written} rows -> {'stdout' if output_file == '-' else output_file}", start)
    return written
