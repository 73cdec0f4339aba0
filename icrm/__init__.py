"""icrm: a thin ICRM reward-model trainer built on icrm_kernels.

Shaped like TRL so users can switch::

    from icrm import RewardConfig, RewardTrainer
    trainer = RewardTrainer(args=RewardConfig(output_dir="runs/mine"), train_dataset="pairs.jsonl")
    trainer.train(); trainer.evaluate(); trainer.save_model("runs/mine/final")
"""

from .config import RewardConfig
from .model import Generator, RewardModel, export_sequence_classification, load_reward_model
from .objective import ICRMLoss, icrm_loss
from .pipeline import run_main_job
from .trainers import RewardTrainer, SFTTrainer

__all__ = [
    "RewardConfig", "RewardTrainer", "SFTTrainer", "RewardModel", "Generator", "icrm_loss", "ICRMLoss",
    "export_sequence_classification", "load_reward_model", "run_main_job",
]
