"""Generate the shipped preference data: list sorting with a mistake at one step.

Prompt ``sort : 12 3 40 7`` and a newline (which keeps prompt and response apart where tools
join them as text), chosen response the sorted list ``3 7 12 40`` written one
number per step, rejected response the same chain with one wrong step (the process
structure ICRM is about): two adjacent steps swapped, a step that writes a number not in
the list, or a skipped step. Everything before the faulty step is correct, so the
per-token reward should drop exactly there.

Run ``python scripts/make_dataset.py`` to rewrite ``icrm/data/sort_train.jsonl`` and
``icrm/data/sort_eval.jsonl`` (fixed seed, disjoint prompts between the splits).
"""

from __future__ import annotations

import argparse
import json
import os
import random

MAX_VALUE = 49
ERRORS = ("swap", "replace", "skip")


def make_pair(rng: random.Random) -> dict:
    size = rng.randint(4, 8)
    values = rng.sample(range(MAX_VALUE + 1), size)
    ordered = sorted(values)
    kind = rng.choice(ERRORS)
    wrong = list(ordered)
    step = rng.randrange(size - 1)
    if kind == "swap":
        wrong[step], wrong[step + 1] = wrong[step + 1], wrong[step]
    elif kind == "replace":
        step = rng.randrange(size)
        outside = [v for v in range(MAX_VALUE + 1) if v not in values]
        wrong[step] = rng.choice(outside)
    else:
        del wrong[step]
    return {
        # The newline ends the prompt: TRL (and most tools) concatenate prompt + response as text.
        "prompt": "sort : " + " ".join(map(str, values)) + "\n",
        "chosen": " ".join(map(str, ordered)),
        "rejected": " ".join(map(str, wrong)),
        "error": kind,
    }


def generate(num_train: int, num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < num_train + num_eval:
        row = make_pair(rng)
        if row["prompt"] in seen:
            continue
        seen.add(row["prompt"])
        rows.append(row)
    return rows[:num_train], rows[num_train:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-eval", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "icrm", "data"))
    args = parser.parse_args(argv)
    train, held_out = generate(args.num_train, args.num_eval, args.seed)
    for name, rows in (("sort_train.jsonl", train), ("sort_eval.jsonl", held_out)):
        with open(os.path.join(args.out_dir, name), "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} pairs to {os.path.join(args.out_dir, name)}")


if __name__ == "__main__":
    main()
