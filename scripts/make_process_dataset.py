"""Generate the shipped process task (``icrm.process_task``): pairs, exact prefix values, best-of-N sets.

Writes to ``icrm/data/`` (fixed seed, prompts disjoint across all files):

* ``process_train.jsonl``: 4000 pairs, lists of 4-8 numbers (``prompt``, ``chosen``, ``rejected``);
* ``process_eval.jsonl``: 500 held-out pairs of the same sizes, with the exact prefix values
  (``chosen_values``, ``rejected_values``, ``prompt_value``) and ``first_error``;
* ``process_eval_long.jsonl``: 300 pairs of 9-12 numbers (longer than training saw), same fields;
* ``process_bon.jsonl`` / ``process_bon_long.jsonl``: 200 prompts each with 16 fresh policy
  samples (``responses``) and whether each is correct (``correct``), for best-of-N selection;
* ``process_val.jsonl`` / ``process_bon_val.jsonl``: a validation split (300 pairs, 100
  best-of-16 prompts, 4-8 numbers) drawn from a second seed (``--val-seed``) with prompts
  disjoint from every file above, for choosing hyperparameters without touching the
  evaluation files. A separate stream, so adding it left the files above unchanged.

Run ``python scripts/make_process_dataset.py`` to rewrite them.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from icrm.process_task import (
    LONG_SIZES, SLIP_RATE, TRAIN_SIZES, make_bon_group, make_pair, random_values,
)

SPLITS = (  # (file, kind, count, sizes)
    ("process_train.jsonl", "pairs", 4000, TRAIN_SIZES),
    ("process_eval.jsonl", "pairs", 500, TRAIN_SIZES),
    ("process_eval_long.jsonl", "pairs", 300, LONG_SIZES),
    ("process_bon.jsonl", "bon", 200, TRAIN_SIZES),
    ("process_bon_long.jsonl", "bon", 200, LONG_SIZES),
)
VALIDATION_SPLITS = (
    ("process_val.jsonl", "pairs", 300, TRAIN_SIZES),
    ("process_bon_val.jsonl", "bon", 100, TRAIN_SIZES),
)
BON_SAMPLES = 16
TRAIN_FIELDS = ("prompt", "chosen", "rejected")


def generate(seed: int, slip_rate: float = SLIP_RATE, splits=SPLITS, seen: set | None = None) -> dict[str, list[dict]]:
    """Rows of each split; prompts disjoint from each other and from ``seen`` (prompt number tuples, updated)."""
    rng = random.Random(seed)
    seen = set() if seen is None else seen
    out = {}
    for name, kind, count, sizes in splits:
        rows = []
        while len(rows) < count:
            values = random_values(rng, sizes)
            if tuple(values) in seen:
                continue
            row = make_pair(values, rng, slip_rate) if kind == "pairs" else make_bon_group(values, rng, BON_SAMPLES, slip_rate)
            if row is None:
                continue
            seen.add(tuple(values))
            rows.append({k: row[k] for k in TRAIN_FIELDS} if name == "process_train.jsonl" else row)
        out[name] = rows
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2506)
    parser.add_argument("--val-seed", type=int, default=2507)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "icrm", "data"))
    args = parser.parse_args(argv)
    seen: set[tuple[int, ...]] = set()
    files = generate(args.seed, seen=seen)
    files.update(generate(args.val_seed, splits=VALIDATION_SPLITS, seen=seen))
    for name, rows in files.items():
        path = os.path.join(args.out_dir, name)
        with open(path, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
