"""Pretrain the built-in tiny model on unlabelled policy samples of the process task (``icrm.pretrain``).

Writes ``icrm/data/tiny_base/`` (weights, config, tokenizer, ``pretrain.json`` with the settings
and the weights' sha256). Fixed seed; about a minute on one core.

    python scripts/pretrain_base.py                       # rewrite the shipped base
    python scripts/pretrain_base.py --out-dir runs/base   # elsewhere (compare the sha256)
"""

from __future__ import annotations

import argparse
import time

import torch

from icrm.pretrain import BASE_DIR, DEFAULTS, pretrain, save_base


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--out-dir", default=BASE_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = {name: getattr(args, name) for name in DEFAULTS}
    start = time.perf_counter()
    model, tokenizer, loss = pretrain(**settings)
    settings.update(final_loss=round(loss, 4), seconds=round(time.perf_counter() - start, 1))
    print(f"wrote {save_base(model, tokenizer, args.out_dir, settings)} (final loss {loss:.4f}, {settings['seconds']} s)")


if __name__ == "__main__":
    main()
