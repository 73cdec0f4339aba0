"""The main job, ``icrm train``: [SFT the generator] -> one reward model per arm from the same
start -> one table. The one place that knows the arms, the stage folders
(``<output_dir>/sft``, ``<output_dir>/<arm>``) and which rank reports.

What runs is what the config names. On the shipped process task (the default ``train_file``)
that is the full job: SFT, the arms ``bt, grm, icrm``, and the process metrics on the shipped
held-out, best-of-16 and longer-input files. A config naming its own ``train_file`` trains one
reward model (``arm``, or the objective fields as given) and evaluates it on its own
``eval_file`` only; ``run_sft: true`` / ``compare_bt: true`` and the extra files are opt-in
there (see ``RewardConfig.uses_shipped_task``).
"""

from __future__ import annotations

import json
import os
import time

from .checkpoint import list_checkpoints, no_checkpoint_error, prepare_output_dir
from .config import ARMS, BUILTIN_MODEL, RewardConfig
from .distributed import launch_rank
from .io_safety import atomic_path, check_model_source
from .metrics import evaluate_suite
from .reporting import metric_table
from .trainers import RewardTrainer, SFTTrainer

#: Stage folders inside the main job's ``output_dir``: the SFT stage and one per arm (``icrm/`` is
#: also the folder of a single run without an arm); a previous run is looked for in them too.
STAGE_DIRS = ("sft", *ARMS)

def sft_args(cfg: RewardConfig, output_dir: str) -> RewardConfig:
    """The generator-SFT stage's config derived from the main config."""
    return cfg.replace(output_dir=output_dir, max_steps=cfg.sft_max_steps, learning_rate=cfg.sft_learning_rate,
                       resume_from_checkpoint=cfg.resume_from_checkpoint and "auto")


def arm_config(cfg: RewardConfig, arm: str, **changes) -> RewardConfig:
    """``cfg`` with ``arm``'s objective (an ICRM arm keeps ``cfg.reg_ratio``, or the default 0.1 when it is 0)."""
    reg_ratio = cfg.reg_ratio or RewardConfig.__dataclass_fields__["reg_ratio"].default
    return cfg.replace(arm=arm, reg_ratio=reg_ratio if arm.startswith("icrm") else 0.0, **changes)


def train_arms(cfg: RewardConfig, arms: list[str], *, train_dataset=None, echo=print, save: bool = True,
               on_arm=None) -> dict:
    """[SFT the generator] -> one reward model per arm from the same init, each scored by
    :func:`icrm.metrics.evaluate_suite` on ``cfg``'s eval files. Returns ``{"sft": ..., arm: metrics}``;
    ``on_arm(arm, metrics)`` is called as each arm finishes (the study writes its rows there).

    The base is ``model_name_or_path``, for the built-in model its pretrained base
    (:func:`icrm.pretrain.base_model_path`); the generator SFT starts there. Reward-model start
    (``reward_model_init``): ``base`` (the authors' recipe), ``generator`` = the SFT-ed model, or
    ``random`` = the base's architecture with random weights; the frozen generator is the SFT-ed
    model in every case.
    """
    from .pretrain import base_model_path, random_model_path

    base = base_model_path(cfg.model_name_or_path)
    summary: dict = {}
    generator = cfg.generator_name_or_path
    if cfg.run_sft and cfg.sft_max_steps > 0:
        sft = SFTTrainer(args=sft_args(cfg, os.path.join(cfg.output_dir, "sft")).replace(model_name_or_path=base),
                         train_dataset=train_dataset)
        summary["sft"] = sft.train()
        generator = sft.save_model()
        echo(f"[sft] generator saved to {generator} (eval token NLL {summary['sft'].get('eval_loss', float('nan')):.3f})")
    init = {"base": base, "generator": generator or base,
            "random": random_model_path(cfg.model_name_or_path)}[cfg.reward_model_init]
    for i, arm in enumerate(arms):
        # A checkpoint path given for the run belongs to the first arm; the others resume their own, and
        # an arm the previous attempt never reached starts fresh ('auto' rather than 'latest').
        resume = cfg.resume_from_checkpoint
        first = "auto" if resume in ("latest", "auto") else resume
        changes = dict(model_name_or_path=init, generator_name_or_path=generator,
                       resume_from_checkpoint=first if i == 0 else resume and "auto")
        # arm None: the objective fields exactly as configured, in the single-run folder icrm/.
        stage = arm_config(cfg, arm, **changes) if arm else cfg.replace(**changes)
        arm = arm or "icrm"
        stage = stage.replace(output_dir=os.path.join(cfg.output_dir, arm))
        start = time.perf_counter()
        trainer = RewardTrainer(args=stage, train_dataset=train_dataset)
        result = trainer.train()
        if save:
            result["model_dir"] = trainer.save_model()
        result["train_s"] = time.perf_counter() - start
        # Every rank scores (the same rows): a sharded (FSDP) model needs all ranks in each forward.
        result.update(evaluate_suite(trainer.model, trainer.tokenizer, eval_file=cfg.eval_file,
                                     eval_long_file=cfg.eval_long_file, bon_file=cfg.bon_file,
                                     bon_long_file=cfg.bon_long_file, max_length=cfg.max_length,
                                     batch_size=cfg.per_device_eval_batch_size))
        if "eval_accuracy" in result:
            result.setdefault("pair_accuracy", result["eval_accuracy"])
        summary[arm] = result
        if on_arm is not None:
            on_arm(arm, result)
        echo(f"[{arm}] {stage.arm_name()} trained in {result['train_s']:.0f} s")
    return summary


def run_main_job(cfg: RewardConfig, *, echo=print) -> dict:
    """``icrm train``: [SFT the generator] -> a reward model per arm (``arm``, or ``arms`` when
    ``compare_bt``) from the same init, then one table of all metrics.

    Outputs: ``<output_dir>/sft/final`` (generator), ``<output_dir>/<arm>/final`` (reward
    models), each stage's ``metrics.jsonl`` and ``training.png``, and ``<output_dir>/summary.json``.
    """
    start = time.perf_counter()
    is_main = launch_rank() == 0
    if not is_main:
        echo = lambda *_: None  # noqa: E731  (one copy of the report under torchrun)
    # Before any model is built: the folder is usable, holds no other run, the paths make sense.
    resume = cfg.resume_from_checkpoint
    prepare_output_dir(cfg.output_dir, resuming=bool(resume), overwrite=cfg.overwrite_output_dir, apply=is_main,
                       stages=STAGE_DIRS)
    arms = list(cfg.arms) if cfg.compare_bt else [cfg.arm or "icrm"]
    stages = ("sft", *arms)
    if resume == "latest" and not any(list_checkpoints(os.path.join(cfg.output_dir, s)) for s in stages):
        raise no_checkpoint_error(cfg.output_dir, stages)
    for name in ("model_name_or_path", "generator_name_or_path", "tokenizer_name_or_path"):
        if getattr(cfg, name) and getattr(cfg, name) != BUILTIN_MODEL:
            check_model_source(getattr(cfg, name), name)
    summary: dict = {"config": cfg.to_dict(), **train_arms(cfg, list(cfg.arms) if cfg.compare_bt else [cfg.arm], echo=echo)}
    summary["wall_s"] = time.perf_counter() - start
    names = None if cfg.compare_bt else [cfg.arm_name()]
    echo(f"\n{metric_table(summary, arms, names)}\n  reward models start from the {cfg.reward_model_init}; "
         f"wall time {summary['wall_s']:.0f} s; outputs in {cfg.output_dir}")
    if is_main:
        with atomic_path(os.path.join(cfg.output_dir, "summary.json")) as tmp, open(tmp, "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary
