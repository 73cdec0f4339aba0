"""``RewardConfig``: every knob of the trainer in one dataclass (YAML + CLI overrides).

Field names follow TRL's ``RewardConfig`` / ``TrainingArguments`` wherever TRL has one, so a
TRL config file mostly carries over; the ICRM-specific fields are grouped at the end. The
defaults are the README's main job: the tiny built-in model on the shipped sorting data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from icrm_kernels.consistency.reference import KINDS as CONSISTENCY_KINDS

from .io_safety import IcrmError, first_line

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

#: ``model_name_or_path`` value that builds the tiny random-init Llama (see ``icrm.model``).
BUILTIN_MODEL = "tiny"
BASELINES = ("row_mean", "response_mean")
KERNEL_BACKENDS = ("auto", "triton", "reference")
SCHEDULERS = ("cosine", "linear", "constant")
#: ``lr_scheduler_kwargs`` each scheduler understands (transformers' names and meaning).
SCHEDULER_KWARGS = {"cosine": ("num_cycles", "min_lr_rate"), "linear": (), "constant": ()}
STRATEGIES = ("steps", "epoch", "no")
REPORTERS = ("tensorboard",)
MAX_LENGTH_POLICIES = ("truncate", "drop")
#: TRL / transformers fields icrm has no knob for, accepted (and then dropped) when their value
#: asks for what icrm does anyway, so a TRL config file loads; any other value is an error.
TRL_FIXED = {
    "optim": ("adamw_torch", "adamw_torch_fused"),  # torch.optim.AdamW
    "adam_epsilon": (1e-8,),  # AdamW's default eps
    "logging_strategy": ("steps",),
    "logging_first_step": (False,),
    "save_only_model": (False,),  # checkpoints hold optimizer, scheduler and RNG state
    "push_to_hub": (False,),
    "dataloader_num_workers": (0,),
    "eval_on_start": (False,),
    "gradient_checkpointing_kwargs": (None, {"use_reentrant": False}),  # icrm's checkpointing is non-reentrant
}
NONFINITE_POLICIES = ("error", "skip")
#: The compared objectives (``arm``): printed name and the fields each one sets. The ICRM arms
#: keep the configured ``reg_ratio`` (> 0); ``bt`` and ``grm`` are the paper's baselines.
ARMS = {
    "bt": ("BT", {"reg_ratio": 0.0, "sft_regularizer": False, "uniform_weights": False}),
    "grm": ("GRM", {"reg_ratio": 0.0, "sft_regularizer": True, "uniform_weights": False}),
    "icrm": ("ICRM", {"sft_regularizer": True, "consistency_kind": "log", "uniform_weights": False}),
    "icrm_uniform": ("ICRM (uniform weights)", {"sft_regularizer": True, "consistency_kind": "log", "uniform_weights": True}),
    "icrm_squared": ("ICRM (squared)", {"sft_regularizer": True, "consistency_kind": "squared", "uniform_weights": False}),
}
RM_INITS = ("base", "generator", "random")
#: ``eval_file`` & co.: the shipped task's file when ``train_file`` is the shipped one, else none.
AUTO = "auto"
#: The shipped process task (``scripts/make_process_dataset.py``): the default training file and
#: the evaluation files a config that trains on it gets without naming them.
SHIPPED_FILES = {name: os.path.join(DATA_DIR, f"process_{split}.jsonl") for name, split in (
    ("train_file", "train"), ("eval_file", "eval"), ("eval_long_file", "eval_long"), ("bon_file", "bon"),
    ("bon_long_file", "bon_long"))}


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class RewardConfig:
    # --- model and data (TRL names) -----------------------------------------------------
    model_name_or_path: str = _help(
        f"Starting causal LM: a Hugging Face folder, a config.json (random init), or '{BUILTIN_MODEL}' "
        "(built-in 2-layer Llama with the built-in word-level tokenizer; `icrm train` starts from its pretrained base "
        "icrm/data/tiny_base).",
        default=BUILTIN_MODEL,
    )
    tokenizer_name_or_path: str | None = _help(
        "Tokenizer folder; default: the model folder if it has one, else the built-in tokenizer.", default=None
    )
    train_file: str = _help("Preference data (JSONL/JSON/Parquet); default: the shipped process task.",
                            default=SHIPPED_FILES["train_file"])
    eval_file: str | None = _help("Held-out preference data ('' or null: none; 'auto': the shipped task's when "
                                  "train_file is the shipped one, else none).", default=AUTO)
    eval_long_file: str | None = _help("Held-out pairs with longer inputs than training (process metrics, '_long'; "
                                       "'auto' as for eval_file).", default=AUTO)
    bon_file: str | None = _help("Best-of-N sets: rows {prompt, responses, correct} ('' or null: none; 'auto' as for "
                                 "eval_file).", default=AUTO)
    bon_long_file: str | None = _help("Best-of-N sets with longer inputs than training ('auto' as for eval_file).",
                                      default=AUTO)
    output_dir: str = _help("Where checkpoints, metrics.jsonl, the plot and the final model go.", default="runs/icrm")
    max_length: int = _help("Max tokens of prompt + response (EOS included); see max_length_policy.", default=64)
    max_length_policy: str = _help(f"One of {MAX_LENGTH_POLICIES}: cut a longer response and put EOS back as its last "
                                   "token (a pair whose prompt leaves no room is dropped), or drop the pair (TRL). "
                                   "Both are counted and warned about.", default="truncate")
    # --- optimisation (TRL names) -------------------------------------------------------
    learning_rate: float = _help("Peak AdamW learning rate.", default=1e-3)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2.", default=0.999)
    max_grad_norm: float = _help("Gradient clipping norm (0: off).", default=1.0)
    lr_scheduler_type: str = _help(f"One of {SCHEDULERS}, after the linear warm-up.", default="cosine")
    lr_scheduler_kwargs: dict | None = _help("Extra scheduler arguments, transformers' names and meaning (a JSON object "
                                             "on the CLI): cosine takes num_cycles and min_lr_rate.", default=None)
    warmup_ratio: float = _help("Fraction of the optimizer steps used for linear warm-up (when warmup_steps is 0).", default=0.05)
    warmup_steps: int | float = _help("Linear warm-up steps (an integer), or a fraction of the optimizer steps (< 1), "
                                      "as in transformers 5; > 0 overrides warmup_ratio.", default=0)
    per_device_train_batch_size: int = _help("Preference pairs per process per micro-batch.", default=16)
    per_device_eval_batch_size: int = _help("Preference pairs per process per eval batch.", default=64)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    num_train_epochs: float = _help("Epochs over the training data (ignored when max_steps > 0).", default=2.0)
    max_steps: int = _help("Optimizer steps (> 0 overrides num_train_epochs).", default=-1)
    seed: int = _help("Seed of model init, data order and RNG.", default=42)
    center_rewards_coefficient: float | None = _help("TRL's reward-centering term coef * mean((R_c + R_r)^2).", default=None)
    gradient_checkpointing: bool = _help("Recompute the backbone's activations in backward.", default=False)
    bf16: bool = _help("bf16 autocast on CUDA (on CPU, which trains in fp32, it is ignored with a warning).", default=False)
    fp16: bool = _help("fp16 autocast + loss scaling on CUDA (on CPU ignored with a warning).", default=False)
    use_peft: bool = _help("Train LoRA adapters instead of the full backbone (value head and head copy stay trainable).", default=False)
    lora_r: int = _help("LoRA rank.", default=16)
    lora_alpha: int = _help("LoRA alpha.", default=32)
    lora_dropout: float = _help("LoRA dropout.", default=0.0)
    lora_target_modules: list[str] | None = _help("LoRA target modules (comma-separated on the CLI); default: peft's per-architecture choice.", default=None)
    logging_steps: int | float = _help("Write metrics every this many optimizer steps (< 1: that fraction of them).", default=10)
    eval_strategy: str = _help(f"One of {STRATEGIES}: evaluate every eval_steps, at each epoch's end, or not during "
                               "training (the final evaluation always runs when there is eval data).", default="steps")
    eval_steps: int | float | None = _help("With eval_strategy steps: evaluate every this many optimizer steps (< 1: "
                                           "that fraction of them; 0: only at the end; null: logging_steps, as in "
                                           "transformers).", default=0)
    save_strategy: str = _help(f"One of {STRATEGIES}: checkpoint every save_steps (and at the end), at each epoch's "
                               "end (and at the end), or never (save_model still writes final/).", default="steps")
    save_steps: int | float = _help("With save_strategy steps: checkpoint every this many optimizer steps (< 1: that "
                                    "fraction of them; 0: only at the end).", default=0)
    save_total_limit: int = _help("Keep the last this many checkpoints (>= 1).", default=2)
    resume_from_checkpoint: str | None = _help(
        "A checkpoint folder; 'latest': the newest intact one in output_dir (an error if there is none); "
        "'auto': the same, or start fresh when there is none.", default=None)
    overwrite_output_dir: bool = _help(
        "Start afresh in an output_dir that holds a previous run: delete that run's checkpoint-N/, final/, "
        "metrics.jsonl, training.png and summary.json (nothing else). Off: such a folder is refused.", default=False)
    on_nonfinite: str = _help(f"A non-finite loss or gradient: 'error' stops the run, 'skip' drops that update "
                              f"(counted in metrics as skipped_steps). One of {NONFINITE_POLICIES}.", default="error")
    report_to: list[str] | None = _help(f"Also log metrics to these (of {REPORTERS}; 'none' or null: only metrics.jsonl).",
                                        default=None)
    fsdp: bool = _help("Shard parameters, gradients and optimizer state over the ranks of a torchrun job with FSDP2 "
                       "(torch.distributed.fsdp.fully_shard): one unit per decoder layer, the rest (embeddings, final "
                       "norm, value head, LM-head copy) in the root unit; bf16/fp16 compute with fp32 gradient "
                       "reduction on CUDA. Off: DDP under torchrun. One process: no effect.", default=False)
    # --- ICRM (ours) --------------------------------------------------------------------
    reg_ratio: float = _help("Weight of the consistency term: L = L_sft + reg_ratio L_align + (1 - reg_ratio) L_bt. 0: GRM.", default=0.1)
    sft_regularizer: bool = _help("Add the GRM SFT term L_sft (off with reg_ratio 0: plain Bradley-Terry).", default=True)
    sft_grad_scale: float = _help("Scale of the SFT term's gradient reaching the backbone (authors' weight_ratio).", default=1e-3)
    weight_scale: float = _help("Pair weight w_t = weight_scale * exp(g_t).", default=2.0)
    gen_temperature: float = _help("Temperature dividing the generator's logits (= 1 / the authors' temp_ratio).", default=1.0)
    consistency_kind: str = _help(f"Consistency loss kind, one of {CONSISTENCY_KINDS}.", default="log")
    baseline: str | None = _help(f"Consistency baseline, one of {BASELINES}; none: row_mean (the authors') for padded "
                                 "batches, response_mean for padding_free ones.", default=None)
    generator_name_or_path: str | None = _help("Frozen generator (causal LM folder); default: a copy of the starting model.", default=None)
    padding_free: bool = _help("Pack each batch into one row with cu_seqlens and restarting position_ids (no padding); "
                               "needs a model whose causal mask honours position_ids (checked at start).", default=False)
    kernels: str = _help(f"icrm_kernels backend, one of {KERNEL_BACKENDS}.", default="auto")
    cpu_threads: int | None = _help("torch CPU threads (0: torch's default; none: 1 for models of hidden size <= 256, "
                                    "which gain nothing from more and slow down badly when cores are shared).", default=None)
    arm: str | None = _help(f"Objective preset, one of {tuple(ARMS)}: bt (Bradley-Terry), grm (reg_ratio 0 + the SFT term), "
                            "icrm, icrm_uniform (consistency weights without the generator's probabilities), icrm_squared "
                            "(kind squared). It sets reg_ratio / sft_regularizer / consistency_kind / uniform_weights; "
                            "none: those fields as given.", default=None)
    uniform_weights: bool = _help("Consistency pair weights all weight_scale instead of weight_scale * exp(g_t) "
                                  "(the icrm_uniform ablation; no generator needed).", default=False)
    value_head_bias: bool = _help("Give the value head a bias (the exported HF model has none and drops it).", default=False)
    # --- the main job's pipeline (ours) -------------------------------------------------
    run_sft: bool | None = _help("`icrm train`: first fine-tune the starting model on the chosen responses (the authors' "
                                 "stage 1) and use it as backbone init and generator. Null: true on the shipped task, "
                                 "false when train_file is your own.", default=None)
    sft_max_steps: int = _help("Optimizer steps of that SFT stage.", default=800)
    sft_learning_rate: float = _help("Learning rate of that SFT stage.", default=3e-3)
    compare_bt: bool | None = _help("`icrm train`: also train the baseline arms (`arms`) from the same init and print one "
                                    "table. Null: true on the shipped task, false when train_file is your own (one "
                                    "reward model: `arm`).", default=None)
    arms: list[str] = _help("`icrm train`: the arms the main job trains when compare_bt is on (comma-separated); "
                            "with compare_bt false only `arm` (or the fields as given) is trained.",
                            default_factory=lambda: ["bt", "grm", "icrm"])
    reward_model_init: str = _help(f"`icrm train`: reward-model start, one of {RM_INITS}: 'base' = the base model (the "
                                   "authors' recipe; for the built-in model its pretrained base, icrm/data/tiny_base), "
                                   "'generator' = the SFT-ed generator, 'random' = the base's architecture with random "
                                   "weights. The generator is the SFT of the base in every case.", default="base")

    def __post_init__(self):
        # What the config does not name follows the data: the shipped task gets its full job, your
        # own train_file only what you name (no shipped evaluation files mixed into your table).
        shipped = self.uses_shipped_task
        for name in ("eval_file", "eval_long_file", "bon_file", "bon_long_file"):
            if getattr(self, name) == AUTO:
                setattr(self, name, SHIPPED_FILES[name] if shipped else None)
        for name in ("run_sft", "compare_bt"):
            if getattr(self, name) is None:
                setattr(self, name, shipped)
        if self.arm in ARMS:
            for name, value in ARMS[self.arm][1].items():
                setattr(self, name, value)
        self.validate()

    @property
    def uses_shipped_task(self) -> bool:
        """Whether ``train_file`` is the shipped process task's (then the unnamed pipeline fields default to its job)."""
        return isinstance(self.train_file, str) and bool(self.train_file) and \
            os.path.realpath(self.train_file) == os.path.realpath(SHIPPED_FILES["train_file"])

    @property
    def uses_generator(self) -> bool:
        """Whether the objective needs the frozen generator (the consistency term with its weights)."""
        return self.reg_ratio > 0 and not self.uniform_weights

    def arm_name(self) -> str:
        """The paper's name of the objective these fields give (``arm`` or inferred from the fields)."""
        if self.reg_ratio == 0:
            return "GRM" if self.sft_regularizer else "BT"
        if self.uniform_weights:
            return ARMS["icrm_uniform"][0]
        return ARMS["icrm_squared"][0] if self.consistency_kind == "squared" else ARMS["icrm"][0] + \
            ("" if self.consistency_kind == "log" else f" ({self.consistency_kind})")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        positive_ints = ("max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                         "gradient_accumulation_steps", "lora_r", "lora_alpha", "save_total_limit")
        for name in positive_ints:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("sft_max_steps", self.sft_max_steps, minimum=0)
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps
        for name in ("logging_steps", "eval_steps", "save_steps", "warmup_steps"):
            _check_steps(name, getattr(self, name), allow_zero=name != "logging_steps")
        _check_int("max_steps", self.max_steps, minimum=-1)
        if self.cpu_threads is not None:
            _check_int("cpu_threads", self.cpu_threads, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and a response token), got {self.max_length}")
        for name in ("learning_rate", "gen_temperature", "weight_scale", "sft_learning_rate"):
            _check_float(name, getattr(self, name), lo=0.0, lo_open=True)
        for name in ("weight_decay", "max_grad_norm", "lora_dropout", "sft_grad_scale"):
            _check_float(name, getattr(self, name), lo=0.0)
        _check_float("num_train_epochs", self.num_train_epochs, lo=0.0, lo_open=True)
        _check_float("reg_ratio", self.reg_ratio, lo=0.0, hi=1.0)
        _check_float("warmup_ratio", self.warmup_ratio, lo=0.0, hi=1.0)
        _check_float("lora_dropout", self.lora_dropout, lo=0.0, hi=1.0, hi_open=True)
        _check_float("adam_beta1", self.adam_beta1, lo=0.0, hi=1.0, hi_open=True)
        _check_float("adam_beta2", self.adam_beta2, lo=0.0, hi=1.0, hi_open=True)
        if self.center_rewards_coefficient is not None:
            _check_float("center_rewards_coefficient", self.center_rewards_coefficient, lo=0.0)
        for name, choices in (("consistency_kind", CONSISTENCY_KINDS), ("baseline", BASELINES),
                              ("kernels", KERNEL_BACKENDS), ("lr_scheduler_type", SCHEDULERS),
                              ("eval_strategy", STRATEGIES), ("save_strategy", STRATEGIES),
                              ("max_length_policy", MAX_LENGTH_POLICIES), ("on_nonfinite", NONFINITE_POLICIES)):
            if getattr(self, name) not in choices and not (name == "baseline" and self.baseline is None):
                raise ValueError(f"{name} must be one of {tuple(choices)}, got {getattr(self, name)!r}")
        for name in ("model_name_or_path", "train_file", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.fsdp and self.use_peft:
            raise ValueError("fsdp and use_peft are both true; LoRA runs replicate the frozen backbone (use DDP: fsdp false)")
        if self.arm is not None and self.arm not in ARMS:
            raise ValueError(f"arm must be one of {tuple(ARMS)} or none, got {self.arm!r}")
        if self.arm is not None and self.arm.startswith("icrm") and self.reg_ratio == 0:
            raise ValueError(f"arm {self.arm!r} needs reg_ratio > 0 (reg_ratio 0 is the grm arm)")
        if not isinstance(self.arms, list) or not self.arms or any(a not in ARMS for a in self.arms):
            raise ValueError(f"arms must be a non-empty list of {tuple(ARMS)}, got {self.arms!r}")
        if self.reward_model_init not in RM_INITS:
            raise ValueError(f"reward_model_init must be one of {RM_INITS}, got {self.reward_model_init!r}")
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose at most one")
        if self.lora_target_modules is not None and (
            not isinstance(self.lora_target_modules, list) or not all(isinstance(m, str) and m for m in self.lora_target_modules)
        ):
            raise ValueError(f"lora_target_modules must be a list of module names, got {self.lora_target_modules!r}")
        if isinstance(self.report_to, str):  # TRL files write one integration as a plain string
            self.report_to = [self.report_to]
        if self.report_to is not None:
            if not isinstance(self.report_to, list) or not all(isinstance(r, str) for r in self.report_to):
                raise ValueError(f"report_to must be a list of integration names, got {self.report_to!r}")
            self.report_to = [r for r in self.report_to if r != "none"] or None
            unknown = sorted(set(self.report_to or ()) - set(REPORTERS))
            if unknown:
                raise ValueError(f"report_to: {unknown} not supported; use one of {REPORTERS} or 'none'")
        kwargs = self.lr_scheduler_kwargs or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"lr_scheduler_kwargs must be a mapping, got {kwargs!r}")
        unknown = sorted(set(kwargs) - set(SCHEDULER_KWARGS[self.lr_scheduler_type]))
        if unknown:
            raise ValueError(f"lr_scheduler_kwargs: {unknown} not understood by lr_scheduler_type "
                             f"{self.lr_scheduler_type!r} (it takes {list(SCHEDULER_KWARGS[self.lr_scheduler_type])})")
        for name, value in kwargs.items():
            _check_float(f"lr_scheduler_kwargs.{name}", value, lo=0.0)

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "RewardConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RewardConfig":
        known = {f.name: f for f in fields(cls)}
        for name in sorted(set(values) & set(TRL_FIXED)):
            value = values[name]
            if isinstance(value, str) and all(isinstance(a, float) for a in TRL_FIXED[name]):
                with contextlib.suppress(ValueError):  # YAML reads 1e-8 as a string
                    value = float(value)
            if value not in TRL_FIXED[name]:
                raise ValueError(f"{name}: icrm supports only {list(TRL_FIXED[name])} (what it always does), got {value!r}")
        values = {k: v for k, v in values.items() if k not in TRL_FIXED}
        if "fsdp" in values:
            values["fsdp"] = _trl_fsdp(values["fsdp"])
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; run `icrm train --help` for the list")
        return cls(**{k: coerce(known[k], v) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str, overrides: dict[str, Any] | None = None) -> "RewardConfig":
        if os.path.isdir(path):
            raise IcrmError(f"config file {path} is a folder; expected a YAML file")
        try:
            with open(path, encoding="utf-8") as fh:
                values = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise IcrmError(f"config file {path} does not exist") from None
        except UnicodeDecodeError as exc:
            raise IcrmError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or first_line(exc)
            raise IcrmError(f"config file {path}: YAML syntax error{where}: {problem}") from None
        if not isinstance(values, dict):
            raise IcrmError(f"config file {path} must hold a mapping of field: value, got {type(values).__name__}")
        values.update(overrides or {})
        return cls.from_dict(values)


def _trl_fsdp(value):
    """TRL's ``fsdp`` (a string or list of modes) as icrm's bool: ``full_shard`` (with or without
    ``auto_wrap``, which icrm always does per decoder layer) is FSDP2, ``""`` / ``[]`` is off;
    anything else is left to the bool parser or refused here."""
    text = " ".join(value) if isinstance(value, list) else value
    if not isinstance(text, str) or text.strip().lower() in _TRUE | _FALSE | {"none", "null"}:
        return value
    modes = set(text.split())
    if not modes:
        return False
    if "full_shard" in modes and modes <= {"full_shard", "auto_wrap"}:
        return True
    raise ValueError(f"fsdp: icrm runs FSDP2 with full sharding per decoder layer: true / false, or TRL's "
                     f"'full_shard' ['auto_wrap']; got {value!r}")


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_steps(name: str, value, *, allow_zero: bool) -> None:
    """A step count: an integer (>= 0, or >= 1), or a fraction of the optimizer steps in (0, 1)."""
    if isinstance(value, float) and 0 < value < 1:
        return
    if isinstance(value, float) and value.is_integer():  # 100.0 from a file
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be an integer >= {0 if allow_zero else 1} or a fraction in (0, 1), got {value!r}")


def resolve_steps(value: int | float, total_steps: int) -> int:
    """A step count, with a fraction (0 < value < 1) taken of ``total_steps`` (rounded up, as transformers does)."""
    return math.ceil(value * total_steps) if 0 < value < 1 else int(value)


def _check_float(name, value, *, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def coerce(f: dataclasses.Field, value):
    """Turn a YAML/CLI value into the field's type; strings from the CLI are parsed here."""
    kind = str(f.type)
    if value is None or not isinstance(value, str):
        if kind.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    text = value.strip()
    if "None" in kind and text.lower() in {"none", "null", ""}:
        return None
    try:
        if kind.startswith("int | float"):
            number = float(text)
            return int(number) if number.is_integer() and "." not in text else number
        if kind.startswith("dict"):
            return json.loads(text)
        if kind.startswith("bool"):
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        if kind.startswith("list"):
            return [item.strip() for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{f.name} must be of type {kind}, got {value!r}") from None
    return text
