"""The generator-SFT grid of the quality study on the validation split (its pre-registration, "Hyperparameters").

For 500 and 1000 training pairs and seeds 100-101 (the study's subsets, seeds apart from its
0-29): SFT of the pretrained base at each (learning rate, steps), scored by the token NLL of the
chosen responses of ``icrm/data/process_val.jsonl``. Writes
``benchmarks/results/quality_sft_validation.json`` (``"size,seed,steps,lr": NLL``) and prints the
mean per setting. Several minutes on one core.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from icrm.config import DATA_DIR, RewardConfig
from icrm.data import read_rows
from icrm.pretrain import base_model_path
from icrm.train import SFTTrainer, sft_args

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "quality_sft_validation.json"
GRID = [(steps, 3e-3) for steps in (50, 100, 150, 300, 600, 1200)] + [(150, 1e-3), (300, 1e-3)]


def main() -> None:
    torch.set_num_threads(1)
    pool = read_rows(f"{DATA_DIR}/process_train.jsonl")
    out = {}
    for size in (500, 1000):
        for seed in (100, 101):
            train = random.Random(1000 + seed).sample(pool, size)
            for steps, lr in GRID:
                cfg = RewardConfig(output_dir=tempfile.mkdtemp(), seed=seed, sft_max_steps=steps, sft_learning_rate=lr,
                                   kernels="reference", cpu_threads=1, eval_file=f"{DATA_DIR}/process_val.jsonl",
                                   save_strategy="no", logging_steps=steps)
                sft = SFTTrainer(args=sft_args(cfg, cfg.output_dir).replace(model_name_or_path=base_model_path("tiny")),
                                 train_dataset=train)
                out[f"{size},{seed},{steps},{lr}"] = sft.train()["eval_loss"]
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    for steps, lr in GRID:
        print(f"lr {lr:g} steps {steps}: mean NLL {np.mean([v for k, v in out.items() if k.endswith(f',{steps},{lr}')]):.4f}")


if __name__ == "__main__":
    main()
