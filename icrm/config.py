"""``RewardConfig``: every knob of the trainer in one dataclass (YAML + CLI overrides).

Field names follow TRL's ``RewardConfig`` / ``TrainingArguments`` wherever TRL has one, so a
TRL config file mostly carries over; the ICRM-specific fields are grouped at the end. The
defaults are the README's main job: the tiny built-in model on the shipped sorting data.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from icrm_kernels.consistency.reference import KINDS as CONSISTENCY_KINDS

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

#: ``model_name_or_path`` value that builds the tiny random-init Llama (see ``icrm.model``).
BUILTIN_MODEL = "tiny"
BASELINES = ("row_mean", "response_mean")
KERNEL_BACKENDS = ("auto", "triton", "reference")
SCHEDULERS = ("cosine", "linear", "constant")
#: The compared objectives (``arm``): printed name and the fields each one sets. The ICRM arms
#: keep the configured ``reg_ratio`` (> 0); ``bt`` and ``grm`` are the paper's baselines.
ARMS = {
    "bt": ("BT", {"reg_ratio": 0.0, "sft_regularizer": False, "uniform_weights": False}),
    "grm": ("GRM", {"reg_ratio": 0.0, "sft_regularizer": True, "uniform_weights": False}),
    "icrm": ("ICRM", {"sft_regularizer": True, "consistency_kind": "log", "uniform_weights": False}),
    "icrm_uniform": ("ICRM (uniform weights)", {"sft_regularizer": True, "consistency_kind": "log", "uniform_weights": True}),
    "icrm_squared": ("ICRM (squared)", {"sft_regularizer": True, "consistency_kind": "squared", "uniform_weights": False}),
}
RM_INITS = ("base", "generator")


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class RewardConfig:
    # --- model and data (TRL names) -----------------------------------------------------
    model_name_or_path: str = _help(
        f"Starting causal LM: a Hugging Face folder, a config.json (random init), or '{BUILTIN_MODEL}' "
        "(built-in 2-layer Llama with the built-in word-level tokenizer).",
        default=BUILTIN_MODEL,
    )
    tokenizer_name_or_path: str | None = _help(
        "Tokenizer folder; default: the model folder if it has one, else the built-in tokenizer.", default=None
    )
    train_file: str = _help("Preference data (JSONL/JSON/Parquet).", default=os.path.join(DATA_DIR, "process_train.jsonl"))
    eval_file: str | None = _help("Held-out preference data ('' or null: none).", default=os.path.join(DATA_DIR, "process_eval.jsonl"))
    eval_long_file: str | None = _help("Held-out pairs with longer inputs than training (process metrics, '_long').",
                                       default=os.path.join(DATA_DIR, "process_eval_long.jsonl"))
    bon_file: str | None = _help("Best-of-N sets: rows {prompt, responses, correct} ('' or null: none).",
                                 default=os.path.join(DATA_DIR, "process_bon.jsonl"))
    bon_long_file: str | None = _help("Best-of-N sets with longer inputs than training.",
                                      default=os.path.join(DATA_DIR, "process_bon_long.jsonl"))
    output_dir: str = _help("Where checkpoints, metrics.jsonl, the plot and the final model go.", default="runs/icrm")
    max_length: int = _help("Max tokens of prompt + response; the response is cut, rows with no response token left are dropped.", default=64)
    # --- optimisation (TRL names) -------------------------------------------------------
    learning_rate: float = _help("Peak AdamW learning rate.", default=1e-3)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2.", default=0.999)
    max_grad_norm: float = _help("Gradient clipping norm (0: off).", default=1.0)
    lr_scheduler_type: str = _help(f"One of {SCHEDULERS}, after the linear warm-up.", default="cosine")
    warmup_ratio: float = _help("Fraction of the optimizer steps used for linear warm-up.", default=0.05)
    per_device_train_batch_size: int = _help("Preference pairs per process per micro-batch.", default=16)
    per_device_eval_batch_size: int = _help("Preference pairs per process per eval batch.", default=64)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    num_train_epochs: float = _help("Epochs over the training data (ignored when max_steps > 0).", default=2.0)
    max_steps: int = _help("Optimizer steps (> 0 overrides num_train_epochs).", default=-1)
    seed: int = _help("Seed of model init, data order and RNG.", default=42)
    center_rewards_coefficient: float | None = _help("TRL's reward-centering term coef * mean((R_c + R_r)^2).", default=None)
    gradient_checkpointing: bool = _help("Recompute the backbone's activations in backward.", default=False)
    bf16: bool = _help("bf16 autocast on CUDA (ignored on CPU, which trains in fp32).", default=False)
    fp16: bool = _help("fp16 autocast + loss scaling on CUDA (ignored on CPU).", default=False)
    use_peft: bool = _help("Train LoRA adapters instead of the full backbone (value head and head copy stay trainable).", default=False)
    lora_r: int = _help("LoRA rank.", default=16)
    lora_alpha: int = _help("LoRA alpha.", default=32)
    lora_dropout: float = _help("LoRA dropout.", default=0.0)
    lora_target_modules: list[str] | None = _help("LoRA target modules (comma-separated on the CLI); default: peft's per-architecture choice.", default=None)
    logging_steps: int = _help("Write metrics every this many optimizer steps.", default=10)
    eval_steps: int = _help("Evaluate every this many optimizer steps (0: only at the end).", default=0)
    save_steps: int = _help("Checkpoint every this many optimizer steps (0: only at the end).", default=0)
    save_total_limit: int = _help("Keep the last this many checkpoints (>= 1).", default=2)
    resume_from_checkpoint: str | None = _help("A checkpoint folder, or 'latest' for the newest one in output_dir.", default=None)
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
    run_sft: bool = _help("`icrm train`: first fine-tune the starting model on the chosen responses (the authors' stage 1) and use it as backbone init and generator.", default=True)
    sft_max_steps: int = _help("Optimizer steps of that SFT stage.", default=800)
    sft_learning_rate: float = _help("Learning rate of that SFT stage.", default=3e-3)
    compare_bt: bool = _help("`icrm train`: also train the baseline arms (`arms`) from the same init and print one table.", default=True)
    arms: list[str] = _help("`icrm train`: the arms the main job trains when compare_bt is on (comma-separated); "
                            "with compare_bt false only `arm` (or the fields as given) is trained.",
                            default_factory=lambda: ["bt", "grm", "icrm"])
    reward_model_init: str = _help(f"`icrm train`: reward-model start, one of {RM_INITS}: 'base' = model_name_or_path "
                                   "(the authors' recipe: base model, the SFT term trains the head copy), 'generator' = "
                                   "the SFT-ed generator (our default: the built-in base model is random init, see docs/trainer.md).",
                                   default="generator")

    def __post_init__(self):
        if self.arm in ARMS:
            for name, value in ARMS[self.arm][1].items():
                setattr(self, name, value)
        self.validate()

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
                         "gradient_accumulation_steps", "lora_r", "lora_alpha", "logging_steps", "save_total_limit")
        for name in positive_ints:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("eval_steps", "save_steps", "sft_max_steps"):
            _check_int(name, getattr(self, name), minimum=0)
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
                              ("kernels", KERNEL_BACKENDS), ("lr_scheduler_type", SCHEDULERS)):
            if getattr(self, name) not in choices and not (name == "baseline" and self.baseline is None):
                raise ValueError(f"{name} must be one of {tuple(choices)}, got {getattr(self, name)!r}")
        for name in ("model_name_or_path", "train_file", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
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

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "RewardConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RewardConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; run `icrm train --help` for the list")
        return cls(**{k: coerce(known[k], v) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str, overrides: dict[str, Any] | None = None) -> "RewardConfig":
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of field: value, got {type(values).__name__}")
        values.update(overrides or {})
        return cls.from_dict(values)


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


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
        if "float" in kind and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    text = value.strip()
    if "None" in kind and text.lower() in {"none", "null", ""}:
        return None
    try:
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
