"""The shipped process task: a scripted, slipping sorting policy with exact prefix values.

Prompt ``sort : 12 3 40 7``. The policy sorts by selection: at every step it writes the
smallest number not yet written. With probability ``slip_rate`` a step slips instead, one of
the kinds possible in the current state chosen uniformly:

* ``swap``: write the second-smallest remaining number (the smallest stays for later);
* ``skip``: drop the smallest remaining number and write the next one;
* ``wrong``: write a number near the smallest remaining one that is not in the list.

``swap`` and ``skip`` need two numbers left. The policy stops (EOS) when nothing is left, so
several slips can occur in one response. The final answer is correct iff the response is the
sorted list.

Exact values. Every step writes one number, and from a correct prefix (the first ``k``
sorted numbers) every slip writes a number other than the next sorted one, so a prefix pins
down the policy's state: ``V(prefix) = P(final answer correct | prefix)`` is
``(1 - slip_rate) ** (n - k)`` for the correct prefix of length ``k`` of an ``n``-number list and
0 for any other prefix. ``tests/test_process_task.py`` checks this against a brute-force
enumeration of all slip paths. The value of a response's prefixes is stored per word plus one
for the EOS token: ``values[i]`` is V after word ``i`` (the last entry, after EOS, is the outcome).
"""

from __future__ import annotations

import random

#: Per-step slip probability of the shipped data.
SLIP_RATE = 0.08
MAX_VALUE = 99
#: ``wrong`` writes the smallest remaining number plus one of these offsets (not in the list).
WRONG_OFFSETS = (-3, -2, -1, 1, 2, 3)
SLIPS = ("swap", "skip", "wrong")
#: List sizes of the training / in-distribution splits and of the longer held-out split.
TRAIN_SIZES = (4, 8)
LONG_SIZES = (9, 12)


def make_prompt(values: list[int]) -> str:
    return "sort : " + " ".join(map(str, values))


def prompt_numbers(prompt: str) -> list[int]:
    words = prompt.split()
    if words[:2] != ["sort", ":"]:
        raise ValueError(f"prompt must start with 'sort :', got {prompt!r}")
    return [int(w) for w in words[2:]]


def slip_options(values: list[int], remaining: list[int]) -> list[tuple[str, int, list[int]]]:
    """``[(kind, written number, remaining after)]`` of every slip possible in this state."""
    smallest, rest = remaining[0], remaining[1:]
    options = []
    if len(remaining) >= 2:
        options.append(("swap", remaining[1], [smallest] + remaining[2:]))
        options.append(("skip", remaining[1], remaining[2:]))
    taken = set(values)
    wrong = sorted({smallest + d for d in WRONG_OFFSETS if 0 <= smallest + d <= MAX_VALUE and smallest + d not in taken})
    options.extend(("wrong", w, list(remaining)) for w in wrong)
    return options


def sample_response(values: list[int], rng: random.Random, slip_rate: float = SLIP_RATE) -> tuple[list[int], list[str]]:
    """One policy sample: ``(written numbers, slip kinds in order)``."""
    remaining, written, slips = sorted(values), [], []
    while remaining:
        if rng.random() < slip_rate:
            options = slip_options(values, remaining)
            kind = rng.choice(sorted({o[0] for o in options}))
            kind, number, remaining = rng.choice([o for o in options if o[0] == kind])
            slips.append(kind)
        else:
            number, remaining = remaining[0], remaining[1:]
        written.append(number)
    return written, slips


def prefix_values(values: list[int], written: list[int], slip_rate: float = SLIP_RATE) -> list[float]:
    """Exact ``V`` after each written number and after EOS (``len(written) + 1`` entries)."""
    target = sorted(values)
    out, on_track = [], True
    for k, number in enumerate(written):
        on_track = on_track and k < len(target) and number == target[k]
        out.append((1 - slip_rate) ** (len(target) - k - 1) if on_track else 0.0)
    out.append(1.0 if on_track and len(written) == len(target) else 0.0)
    return out


def first_error(values: list[int], written: list[int]) -> int | None:
    """Index of the first response token (EOS = ``len(written)``) after which the answer is lost."""
    target = sorted(values)
    for k, number in enumerate(written):
        if k >= len(target) or number != target[k]:
            return k
    return None if len(written) == len(target) else len(written)


def random_values(rng: random.Random, sizes: tuple[int, int]) -> list[int]:
    return rng.sample(range(MAX_VALUE + 1), rng.randint(*sizes))


def make_pair(values: list[int], rng: random.Random, slip_rate: float = SLIP_RATE, max_tries: int = 200) -> dict | None:
    """Two policy samples of one prompt with different outcomes, correct one as ``chosen``
    (None when ``max_tries`` samples do not give both outcomes)."""
    correct, wrong = None, None
    for _ in range(max_tries):
        written, slips = sample_response(values, rng, slip_rate)
        if slips and wrong is None:
            wrong = (written, slips)
        elif not slips and correct is None:
            correct = written
        if correct is not None and wrong is not None:
            break
    else:
        return None
    text = lambda ns: " ".join(map(str, ns))  # noqa: E731
    return {
        "prompt": make_prompt(values), "chosen": text(correct), "rejected": text(wrong[0]), "slips": wrong[1],
        "chosen_values": prefix_values(values, correct, slip_rate),
        "rejected_values": prefix_values(values, wrong[0], slip_rate),
        "prompt_value": (1 - slip_rate) ** len(values),
        "first_error": first_error(values, wrong[0]),
    }


def make_bon_group(values: list[int], rng: random.Random, num_samples: int, slip_rate: float = SLIP_RATE) -> dict:
    """``num_samples`` fresh policy samples of one prompt and whether each is correct."""
    samples = [sample_response(values, rng, slip_rate) for _ in range(num_samples)]
    return {"prompt": make_prompt(values), "responses": [" ".join(map(str, w)) for w, _ in samples],
            "correct": [not slips for _, slips in samples]}


def is_correct(prompt: str, response: str) -> bool:
    """Whether ``response`` is the sorted list of the prompt's numbers."""
    try:
        return [int(w) for w in response.split()] == sorted(prompt_numbers(prompt))
    except ValueError:
        return False
