"""The process task's exact prefix values against a brute-force enumeration of the policy."""

import functools
import json
import random
from fractions import Fraction
from pathlib import Path

import pytest

from icrm import process_task as pt

DATA = Path(__file__).resolve().parent.parent / "icrm" / "data"


@functools.lru_cache(maxsize=None)
def steps(values, remaining, depth, p):
    """Every way the policy can run ``depth`` steps from ``remaining`` (or stop before):
    ``{(written, remaining after): probability}``, by walking all slip paths (exact fractions)."""
    out = {}

    def walk(remaining, written, prob):
        if not remaining or len(written) == depth:
            key = (tuple(written), tuple(remaining))
            out[key] = out.get(key, 0) + prob
            return
        walk(remaining[1:], written + [remaining[0]], prob * (1 - p))
        options = pt.slip_options(values, remaining)
        kinds = sorted({o[0] for o in options})
        for kind, number, after in options:
            same_kind = sum(o[0] == kind for o in options)
            walk(after, written + [number], prob * p / len(kinds) / same_kind)

    walk(list(remaining), [], Fraction(1))
    return out


def run(values, remaining, depth, p):
    return steps(tuple(values), tuple(remaining), depth, p)


def brute_force_value(values, prefix, p):
    """P(final answer correct | the response starts with ``prefix``), from the enumeration alone:
    over the paths writing ``prefix``, the chance the rest writes exactly the missing sorted numbers."""
    target = tuple(sorted(values))
    mass = good = Fraction(0)
    for (written, remaining), prob in run(values, target, len(prefix), p).items():
        if written != tuple(prefix):
            continue
        mass += prob
        rest = target[len(prefix):] if target[:len(prefix)] == tuple(prefix) else None
        if rest is not None:
            good += prob * sum(q for (w, r), q in run(values, remaining, len(rest) + 1, p).items() if w == rest and not r)
    return mass, good / mass if mass else None


# Small lists near 0 keep the number of `wrong` options (and the enumeration) small.
@pytest.mark.parametrize("values", [[7], [5, 2], [9, 1, 4], [2, 0, 1, 3]])
def test_prefix_values_match_brute_force(values):
    p = Fraction(1, 7)
    target = sorted(values)
    assert brute_force_value(values, [], p)[1] == (1 - p) ** len(values)
    checked = 0
    for depth in range(1, len(values) + 2):
        ends = {}  # written -> whether some path is complete there (several remaining states share a prefix)
        for (written, remaining) in run(values, target, depth, p):
            if len(written) == depth or not remaining:
                ends[written] = ends.get(written, False) or not remaining
        for written, complete in ends.items():
            if not complete:  # a prefix (EOS not yet written)
                mass, exact = brute_force_value(values, list(written), p)
                assert pt.prefix_values(values, list(written), float(p))[len(written) - 1] == pytest.approx(float(exact), abs=1e-12)
            else:  # a complete response: the entry after EOS is its outcome
                vals = pt.prefix_values(values, list(written), float(p))
                assert vals[-1] == (1.0 if list(written) == target else 0.0)
                fe = pt.first_error(values, list(written))
                assert (fe is None) == (list(written) == target)
                if fe is not None:  # V > 0 before the first error, 0 from it on
                    assert all(v > 0 for v in vals[:fe]) and all(v == 0 for v in vals[fe:])
            checked += 1
    assert checked > len(values)


def test_samples_lie_in_the_enumerated_support():
    rng = random.Random(0)
    values = [12, 3, 40, 7]
    for _ in range(300):
        written, slips = pt.sample_response(values, rng, slip_rate=0.5)
        support = run(values, sorted(values), len(written), Fraction(1, 2))
        assert (tuple(written), ()) in support
        assert (not slips) == (written == sorted(values))


def test_shipped_files_are_consistent():
    train = [json.loads(line) for line in open(DATA / "process_train.jsonl")]
    assert len(train) == 4000
    seen = {r["prompt"] for r in train}
    for name, sizes in (("process_eval.jsonl", pt.TRAIN_SIZES), ("process_eval_long.jsonl", pt.LONG_SIZES)):
        rows = [json.loads(line) for line in open(DATA / name)]
        for r in rows[:100]:
            values = pt.prompt_numbers(r["prompt"])
            assert sizes[0] <= len(values) <= sizes[1] and r["prompt"] not in seen
            assert pt.is_correct(r["prompt"], r["chosen"]) and not pt.is_correct(r["prompt"], r["rejected"])
            assert r["chosen_values"] == pytest.approx(pt.prefix_values(values, [int(w) for w in r["chosen"].split()]))
            assert r["rejected_values"] == pytest.approx(pt.prefix_values(values, [int(w) for w in r["rejected"].split()]))
            assert r["first_error"] == pt.first_error(values, [int(w) for w in r["rejected"].split()])
    for name in ("process_bon.jsonl", "process_bon_long.jsonl"):
        for g in [json.loads(line) for line in open(DATA / name)][:50]:
            assert len(g["responses"]) == 16 and g["prompt"] not in seen
            assert g["correct"] == [pt.is_correct(g["prompt"], r) for r in g["responses"]]
