"""Process-level evaluation of a reward model against exact prefix values.

Pair rows carry ``chosen_values`` / ``rejected_values`` (``V`` after each whitespace word of the
response and after EOS), ``prompt_value`` and ``first_error`` (see :mod:`icrm.process_task`).
The per-token reward read for word ``i`` is the reward at the word's last token; the "drop" at
word ``i`` is the reward before it minus the reward after it (before word 0: the reward at the
last prompt token). Metrics:

* ``pair_accuracy``: sequence reward (at EOS) of chosen above rejected;
* ``value_spearman``: Spearman correlation of per-word rewards with ``V``, pooled over all
  responses' prefixes;
* ``value_auroc``: AUROC of the per-word reward for "the answer is still reachable" (``V > 0``);
* ``first_error_acc``: fraction of rejected responses whose largest reward drop is at ``first_error``;
* ``bon_accuracy``: per prompt, the highest-reward of its N policy samples; fraction correct.
"""

from __future__ import annotations

import numpy as np

from .data import encode_pair, read_rows
from .inference import token_rewards

#: The metric names :func:`evaluate_process` and :func:`best_of_n` return.
PAIR_METRICS = ("pair_accuracy", "value_spearman", "value_auroc", "first_error_acc")
BON_METRICS = ("bon_accuracy",)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values; a run's ranks are averaged.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks); nan if either is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def auroc(scores, labels) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U / n+ n-)."""
    labels = np.asarray(labels, dtype=bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def word_end_tokens(tokenizer, response: str, prompt: str = "") -> list[int]:
    """Index (within the response tokens of ``prompt + response``, tokenized as one text as
    :func:`icrm.data.encode_pair` does) of each whitespace word's last token, then of EOS."""
    ids, prompt_len, offsets = encode_pair(prompt, response, tokenizer)
    text_tokens = range(prompt_len, len(ids) - 1)  # the response's tokens, EOS excluded
    out, pos = [], 0
    for word in response.split():
        start = response.index(word, pos)
        pos = start + len(word)
        out.append(max(i for i in text_tokens if offsets[i][0] < len(prompt) + pos) - prompt_len)
    out.append(len(ids) - 1 - prompt_len)
    return out


def word_rewards(rm, tokenizer, items: list[tuple[str, str]], *, max_length: int, batch_size: int = 256,
                 progress=None) -> list[np.ndarray]:
    """Per ``(prompt, response)``: rewards ``[words + 2]``: at the last prompt token, after each word, at EOS.

    Raises if a response does not fit ``max_length`` (a truncated response has no EOS reward).
    """
    out = []
    scored = token_rewards(rm, tokenizer, items, max_length=max_length, batch_size=batch_size, progress=progress)
    for (prompt, response), item in zip(items, scored):
        if item is None or item.truncated:
            raise ValueError(f"max_length={max_length} is too short for the prompt + response {prompt!r} -> {response!r}")
        index = [item.prompt_len - 1] + [item.prompt_len + j for j in word_end_tokens(tokenizer, response, prompt)]
        out.append(item.rewards[index])
    return out


def process_metrics(rows: list[dict], rewards: list[np.ndarray]) -> dict[str, float]:
    """The pair metrics from rows with prefix values and ``word_rewards`` of (chosen, rejected) per row
    (``rewards[2 i]`` chosen, ``rewards[2 i + 1]`` rejected)."""
    values, scores, hits, wins = [], [], [], []
    for i, row in enumerate(rows):
        chosen, rejected = rewards[2 * i], rewards[2 * i + 1]
        wins.append(chosen[-1] > rejected[-1])
        for r, key in ((chosen, "chosen_values"), (rejected, "rejected_values")):
            v = row[key]
            if len(v) != len(r) - 1:
                raise ValueError(f"row {i}: {key} has {len(v)} entries, expected words + 1 = {len(r) - 1}")
            values.extend(v)
            scores.extend(r[1:])
        if row.get("first_error") is not None:
            drops = rejected[:-1] - rejected[1:]
            hits.append(int(np.argmax(drops)) == row["first_error"])
    values = np.asarray(values)
    return {"pair_accuracy": float(np.mean(wins)), "value_spearman": spearman(scores, values),
            "value_auroc": auroc(scores, values > 0),
            "first_error_acc": float(np.mean(hits)) if hits else float("nan")}


def has_prefix_values(rows: list[dict]) -> bool:
    return bool(rows) and all(isinstance(r, dict) and "chosen_values" in r and "rejected_values" in r for r in rows)


def evaluate_process(rm, tokenizer, rows, *, max_length: int, batch_size: int = 256, progress=None) -> dict[str, float]:
    """:data:`PAIR_METRICS` of a reward model on pair rows (or a file) with prefix values."""
    rows = read_rows(rows) if isinstance(rows, str) else rows
    if not has_prefix_values(rows):
        raise ValueError("eval rows need 'chosen_values' and 'rejected_values' (exact prefix values) for process metrics")
    items = [(row["prompt"], row[side]) for row in rows for side in ("chosen", "rejected")]
    return process_metrics(rows, word_rewards(rm, tokenizer, items, max_length=max_length, batch_size=batch_size,
                                              progress=progress))


def best_of_n(rm, tokenizer, groups, *, max_length: int, batch_size: int = 256, progress=None) -> dict[str, float]:
    """``bon_accuracy`` on rows ``{"prompt", "responses": [N], "correct": [N]}`` (or a file), plus
    the arm-free references ``bon_random`` (mean correct) and ``bon_oracle`` (any correct)."""
    groups = read_rows(groups) if isinstance(groups, str) else groups
    items = [(g["prompt"], resp) for g in groups for resp in g["responses"]]
    seq = [r[-1] for r in word_rewards(rm, tokenizer, items, max_length=max_length, batch_size=batch_size,
                                       progress=progress)]
    picked, k = [], 0
    for g in groups:
        n = len(g["responses"])
        picked.append(bool(g["correct"][int(np.argmax(seq[k:k + n]))]))
        k += n
    return {"bon_accuracy": float(np.mean(picked)), "bon_random": float(np.mean([np.mean(g["correct"]) for g in groups])),
            "bon_oracle": float(np.mean([any(g["correct"]) for g in groups]))}


def evaluate_suite(rm, tokenizer, *, eval_file=None, eval_long_file=None, bon_file=None, bon_long_file=None,
                   max_length: int, batch_size: int = 256) -> dict[str, float]:
    """The process metrics on the files given (``_long`` suffix for the longer-input files).

    Pair files without prefix values are skipped (the trainer's ``evaluate`` covers their accuracy).
    """
    out: dict[str, float] = {}
    for path, suffix in ((eval_file, ""), (eval_long_file, "_long")):
        rows = read_rows(path) if path else []
        if has_prefix_values(rows):
            metrics = evaluate_process(rm, tokenizer, rows, max_length=max_length, batch_size=batch_size)
            out.update({k + suffix: v for k, v in metrics.items()})
    for path, suffix in ((bon_file, ""), (bon_long_file, "_long")):
        if path:
            out.update({k + suffix: v for k, v in best_of_n(rm, tokenizer, path, max_length=max_length,
                                                             batch_size=batch_size).items()})
    return out
