"""A pretrained tiny base: the built-in Llama trained as a causal LM on unlabelled policy samples.

The paper's reward model starts from a base model that already reads the task; the built-in
``tiny`` model is random init. This module gives it a base: ``corpus`` draws prompts and policy
samples of the shipped process task (:mod:`icrm.process_task`, fixed seed, prompts disjoint from
every shipped data file, list sizes of the training split), and ``pretrain`` fits next-token
prediction on the whole text (prompt and response, EOS included) with AdamW and a cosine
schedule. The result is shipped in ``icrm/data/tiny_base/`` (``python scripts/pretrain_base.py``
rewrites it; ``pretrain.json`` there records the settings and the weights' sha256).

In the main job (``icrm.train.train_arms``) the built-in model's base is this checkpoint:
``reward_model_init: base`` starts the reward model here, the generator is its SFT, and
``reward_model_init: random`` keeps the old random-init start.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random

import torch

from .config import BUILTIN_MODEL, DATA_DIR
from .data import pad_rows, read_rows, tokenize_pair
from .process_task import SLIP_RATE, TRAIN_SIZES, make_prompt, random_values, sample_response

#: The shipped pretrained base of the built-in model.
BASE_DIR = os.path.join(DATA_DIR, "tiny_base")
SETTINGS_NAME = "pretrain.json"
#: The shipped files whose prompts the pretraining corpus avoids.
SHIPPED_FILES = ("process_train.jsonl", "process_eval.jsonl", "process_eval_long.jsonl", "process_bon.jsonl",
                 "process_bon_long.jsonl", "process_val.jsonl", "process_bon_val.jsonl")
#: ``scripts/pretrain_base.py``'s defaults: about a minute on one core.
DEFAULTS = {"seed": 2508, "samples": 40000, "steps": 2500, "batch_size": 32, "learning_rate": 3e-3, "max_length": 64}


def shipped_prompts() -> set[str]:
    prompts = set()
    for name in SHIPPED_FILES:
        path = os.path.join(DATA_DIR, name)
        if os.path.exists(path):
            prompts.update(row["prompt"] for row in read_rows(path))
    return prompts


def corpus(seed: int, samples: int, *, exclude: set[str] | None = None, slip_rate: float = SLIP_RATE) -> list[tuple[str, str]]:
    """``samples`` unlabelled ``(prompt, response)`` policy samples (one per prompt, prompts not in ``exclude``)."""
    rng = random.Random(seed)
    exclude = set() if exclude is None else exclude
    out, seen = [], set()
    while len(out) < samples:
        values = random_values(rng, TRAIN_SIZES)
        prompt = make_prompt(values)
        if prompt in exclude or prompt in seen:
            continue
        seen.add(prompt)
        written, _ = sample_response(values, rng, slip_rate)
        out.append((prompt, " ".join(map(str, written))))
    return out


def pretrain(*, seed: int, samples: int, steps: int, batch_size: int, learning_rate: float, max_length: int,
             echo=print):
    """``(model, tokenizer, final loss)``: the built-in model after ``steps`` AdamW steps of next-token
    prediction on :func:`corpus` (cosine schedule, 5% warm-up); deterministic for a seed on one machine."""
    from .model import build_tiny_tokenizer, load_causal_lm

    for name in ("samples", "steps", "batch_size", "max_length"):
        value = locals()[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    tokenizer = build_tiny_tokenizer()
    texts = corpus(seed, samples, exclude=shipped_prompts())
    encoded = [tokenize_pair(p, r, tokenizer, max_length) for p, r in texts]
    if any(e is None or e[2] for e in encoded):
        raise ValueError(f"max_length={max_length} is too short for the pretraining corpus")
    ids = [e[0] for e in encoded]
    model = load_causal_lm(BUILTIN_MODEL, tokenizer, seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup)))))
    order_rng = random.Random(seed + 1)
    order: list[int] = []
    loss_value = float("nan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            if len(order) < batch_size:
                order += order_rng.sample(range(len(ids)), len(ids))
            batch_ids, order = [ids[i] for i in order[:batch_size]], order[batch_size:]
            # Every token is a target (prompt_len 0): a base model reads the whole text.
            batch = pad_rows(batch_ids, [0] * len(batch_ids), tokenizer.pad_token_id)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss_value = float(out.loss.detach())
            if echo and (step + 1) % max(1, steps // 10) == 0:
                echo(f"[pretrain] step {step + 1}/{steps} loss {loss_value:.4f}")
    return model, tokenizer, loss_value


def weights_sha256(directory: str) -> str:
    with open(os.path.join(directory, "model.safetensors"), "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def save_base(model, tokenizer, directory: str, settings: dict) -> str:
    from .model import save_tokenizer

    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    record = {**settings, "sha256": weights_sha256(directory), "torch": torch.__version__}
    with open(os.path.join(directory, SETTINGS_NAME), "w") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")
    return directory


def base_model_path(model_name_or_path: str) -> str:
    """The main job's base model: the shipped pretrained base for the built-in model, else the path itself."""
    if model_name_or_path != BUILTIN_MODEL:
        return model_name_or_path
    if not os.path.exists(os.path.join(BASE_DIR, "model.safetensors")):
        raise FileNotFoundError(f"{BASE_DIR}: the pretrained tiny base is missing; run python scripts/pretrain_base.py")
    return BASE_DIR


def random_model_path(model_name_or_path: str) -> str:
    """The same architecture with random weights: ``tiny``, or the folder's ``config.json``."""
    if model_name_or_path == BUILTIN_MODEL or model_name_or_path.endswith(".json"):
        return model_name_or_path
    config = os.path.join(model_name_or_path, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"reward_model_init random: model_name_or_path {model_name_or_path!r} has no config.json to "
                         "build random weights from")
    return config
