"""The trainer's names in one place, as before the split (``from icrm.train import X`` keeps working).

Where each lives:

* :mod:`icrm.loop`: the training loop both trainers share (``BaseTrainer``), the schedule, seeds,
  the Ctrl-C / SIGTERM stop (``TrainingInterrupted``);
* :mod:`icrm.trainers`: ``RewardTrainer``, ``SFTTrainer``, ``build_reward_model``;
* :mod:`icrm.checkpoint`: checkpoint folders and their files (write, verify, read, resume);
* :mod:`icrm.distributed`: ``torchrun`` process group, FSDP2 sharding, collectives;
* :mod:`icrm.pipeline`: the main job ``icrm train`` (arms, stage folders, rank);
* :mod:`icrm.inference`: ``icrm eval`` / ``icrm score`` and the one scoring path;
* :mod:`icrm.reporting`: ``metrics.jsonl``, ``training.png``, the metric table.
"""

from .distributed import init_distributed, shard_with_fsdp
from .inference import evaluate_file, score_file, token_rewards
from .loop import BaseTrainer, TrainingInterrupted, check_finite_model, lr_lambda, set_cpu_threads, set_seed
from .pipeline import arm_config, run_main_job, sft_args, train_arms
from .reporting import TABLE_ROWS, metric_table, peak_memory_gb
from .trainers import RewardTrainer, SFTTrainer, build_reward_model

__all__ = [
    "BaseTrainer", "RewardTrainer", "SFTTrainer", "TrainingInterrupted", "build_reward_model", "TABLE_ROWS",
    "arm_config", "check_finite_model", "evaluate_file", "init_distributed", "lr_lambda", "metric_table",
    "peak_memory_gb", "run_main_job", "score_file", "set_cpu_threads", "set_seed", "sft_args", "shard_with_fsdp",
    "token_rewards", "train_arms",
]
