"""A plain PyTorch training loop (nanoGPT-sized) for the reward model and the generator SFT.

``RewardTrainer`` is shaped like TRL's (``model``, ``args``, ``train_dataset``,
``eval_dataset``, ``processing_class``; ``.train()``, ``.evaluate()``, ``.save_model()``).
``SFTTrainer`` fine-tunes the generator on the chosen responses (the authors' first stage).
Both share :class:`_Trainer`: AdamW, warm-up + cosine/linear/constant schedule, gradient
accumulation and clipping, tqdm, ``metrics.jsonl``, a loss/accuracy PNG, DDP under
``torchrun``, and atomic checkpoints with exact resume.

Checkpoint ``checkpoint-<step>/``: ``model.safetensors`` (full weights, or with LoRA the
adapters + value head + head copy), ``config.json`` + tokenizer, ``optimizer.pt``,
``scheduler.pt``, ``rng_state_<rank>.pt``, ``trainer_state.json`` (step, epoch, batch
position, EMA S of every rank, log history). It is written into ``tmp-checkpoint-*`` and
renamed into place, so a killed run never leaves a partial ``checkpoint-<step>``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import resource
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from icrm_kernels import linear_logprobs

from .config import ARMS, RewardConfig
from .data import IGNORE_INDEX, PreferenceDataset, collate_pairs, collate_sft, epoch_batches
from .model import (
    RM_CONFIG_NAME, Generator, RewardModel, apply_lora, check_packing_support, decoder_of,
    enable_activation_checkpointing, last_hidden, load_causal_lm, load_tokenizer, save_reward_model, shifted_targets,
)
from .objective import INITIAL_SMOOTH_WEIGHT, icrm_loss

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"


# ------------------------------------------------------------------------------------------
# Small helpers

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_cpu_threads(requested: int | None, hidden_size: int) -> None:
    """``cpu_threads``: 0 keeps torch's default; None means 1 for small models (<= 256 wide)."""
    if requested is None:
        requested = 1 if hidden_size <= 256 else 0
    if requested > 0:
        torch.set_num_threads(requested)


def init_distributed() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; joins the process group under ``torchrun``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in ``output_dir``, oldest first (tmp dirs are never listed)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit() \
                and os.path.exists(os.path.join(path, TRAINER_STATE)):
            found.append((int(name[len(CHECKPOINT_PREFIX):]), path))
    return [p for _, p in sorted(found)]


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def _as_dataset(source, tokenizer, max_length: int, name: str):
    if source is None or isinstance(source, PreferenceDataset):
        return source
    return PreferenceDataset(source, tokenizer, max_length, name=name)


# ------------------------------------------------------------------------------------------

class _Trainer:
    """The shared loop. Subclasses give ``_loss(batch, training) -> (loss, metrics)`` and the model I/O."""

    collate = staticmethod(collate_pairs)

    def __init__(self, model: torch.nn.Module, args: RewardConfig, train_dataset, eval_dataset, tokenizer):
        self.args, self.tokenizer = args, tokenizer
        self.rank, self.world_size, local_rank = init_distributed()
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            set_cpu_threads(args.cpu_threads, model.config.get_text_config().hidden_size)
        self.model = model.to(self.device)
        if args.padding_free:
            check_packing_support(self.model.backbone)
        self._train_source, self._train_dataset = train_dataset, None  # tokenized on first use
        self.eval_dataset = _as_dataset(eval_dataset, tokenizer, args.max_length, "eval")
        self.module = self.model
        if self.world_size > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        amp_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self.autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype and self.device.type == "cuda" \
            else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler("cuda") if args.fp16 and self.device.type == "cuda" else None
        self.global_step, self.epoch, self.batch_in_epoch, self.num_tokens = 0, 0, 0, 0
        self.log_history: list[dict] = []
        self.smooth_weight = INITIAL_SMOOTH_WEIGHT

    # --- subclass hooks -----------------------------------------------------------------
    def _loss(self, batch, training: bool):
        raise NotImplementedError

    def _model_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save_model(self, output_dir: str | None = None) -> str:
        raise NotImplementedError

    def _write_model_meta(self, directory: str) -> None:
        """Extra files that make a checkpoint loadable on its own (none by default)."""

    # --- setup --------------------------------------------------------------------------
    @property
    def train_dataset(self):
        if self._train_dataset is None and self._train_source is not None:
            self._train_dataset = _as_dataset(self._train_source, self.tokenizer, self.args.max_length, "train")
        return self._train_dataset

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _batches(self, epoch: int) -> list[list[int]]:
        if getattr(self, "_batches_epoch", None) != epoch:
            self._batches_epoch = epoch
            self._epoch_batches = epoch_batches(len(self.train_dataset), self.args.per_device_train_batch_size,
                                                seed=self.args.seed, epoch=epoch, rank=self.rank,
                                                world_size=self.world_size)
        return self._epoch_batches

    def _total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_epoch = math.ceil(len(self._batches(0)) / self.args.gradient_accumulation_steps)
        return max(1, math.ceil(per_epoch * self.args.num_train_epochs))

    def _build_optimizer(self, total_steps: int) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.args.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate,
                                           betas=(self.args.adam_beta1, self.args.adam_beta2))
        warmup = int(self.args.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.args.lr_scheduler_type, warmup, total_steps)
        )

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _eval_batches(self, eval_dataset, collate):
        """``(indices, device batch)`` over this rank's share of ``eval_dataset`` (or the trainer's)."""
        dataset = _as_dataset(eval_dataset, self.tokenizer, self.args.max_length, "eval") or self.eval_dataset
        if dataset is None:
            raise ValueError("no eval_dataset given")
        pad, packed = self.tokenizer.pad_token_id, self.args.padding_free
        batches = epoch_batches(len(dataset), self.args.per_device_eval_batch_size, seed=0, epoch=0,
                                rank=self.rank, world_size=self.world_size, shuffle=False)
        # Resolved eagerly (a missing dataset raises here, before any mode change); batches lazily.
        return ((indices, self._to_device(collate([dataset[i] for i in indices], pad, packed=packed)))
                for indices in batches)

    def _reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        vec = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(vec)
        return {k: float(v) / self.world_size for k, v in zip(keys, vec.tolist())}

    # --- the loop -----------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | None = None) -> dict:
        args = self.args
        if self.train_dataset is None:
            raise ValueError("train_dataset is None; pass one to the trainer")
        set_seed(args.seed)
        total_steps = self._total_steps()
        self._build_optimizer(total_steps)
        resume = resume_from_checkpoint or args.resume_from_checkpoint
        if resume:
            self._load_checkpoint(resume)
        self.model.train()
        accum = args.gradient_accumulation_steps
        bar = tqdm(total=total_steps, initial=self.global_step, desc=type(self).__name__, disable=not self.is_main,
                   dynamic_ncols=True)
        window: dict[str, list[float]] = {}
        tokens_in_window, t_window = 0, time.perf_counter()
        micro = 0
        while self.global_step < total_steps:
            batches = self._batches(self.epoch)
            if self.batch_in_epoch >= len(batches):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                continue
            indices = batches[self.batch_in_epoch]
            batch = self._to_device(self.collate([self.train_dataset[i] for i in indices], self.tokenizer.pad_token_id,
                                                 packed=args.padding_free))
            micro += 1
            last_micro = micro % accum == 0
            metrics = self.training_step(batch, accum=accum, sync=last_micro)
            self.batch_in_epoch += 1
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            tokens_in_window += tokens
            self.num_tokens += tokens * self.world_size
            for k, v in metrics.items():
                window.setdefault(k, []).append(v)
            if not last_micro:
                continue
            grad_norm = self._optimizer_step()
            self.global_step += 1
            bar.update(1)
            if self.global_step % args.logging_steps == 0 or self.global_step == total_steps:
                elapsed = time.perf_counter() - t_window
                record = {k: sum(v) / len(v) for k, v in window.items()}
                record["grad_norm"] = grad_norm
                record["tokens_per_s"] = tokens_in_window / max(elapsed, 1e-9)
                record = self._reduce_mean(record)
                record["tokens_per_s"] *= self.world_size
                record.update(step=self.global_step, epoch=self.epoch + self.batch_in_epoch / max(1, len(batches)),
                              lr=self.scheduler.get_last_lr()[0], num_tokens=self.num_tokens,
                              peak_mem_gb=peak_memory_gb(self.device))
                self._log(record)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "accuracy") if k in record})
                window, tokens_in_window, t_window = {}, 0, time.perf_counter()
            if args.eval_steps and self.global_step % args.eval_steps == 0 and self.eval_dataset is not None:
                self._log({"step": self.global_step, **self.evaluate()})
            if args.save_steps and self.global_step % args.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        if not list_checkpoints(args.output_dir) or not list_checkpoints(args.output_dir)[-1].endswith(f"-{self.global_step}"):
            self.save_checkpoint()
        result = {"step": self.global_step}
        if self.eval_dataset is not None:
            result.update(self.evaluate())
            self._log({"step": self.global_step, **result})
        if self.is_main:
            self.plot()
        return result

    def training_step(self, batch: dict, accum: int = 1, sync: bool = True) -> dict[str, float]:
        """Forward and backward of one micro-batch (on the device): autocast, the loss divided by
        ``accum`` (and scaled under fp16), DDP gradient sync only when ``sync``. Returns its metrics.

        One optimizer step of the loop is ``accum`` of these, then :meth:`_optimizer_step`.
        """
        ctx = contextlib.nullcontext() if sync or self.world_size == 1 else self.module.no_sync()
        with ctx:
            with self.autocast():
                loss, metrics = self._loss(batch, training=True)
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return metrics

    def _optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _log(self, record: dict) -> None:
        self.log_history.append(record)
        if self.is_main:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def plot(self) -> str | None:
        """``training.png``: loss parts and accuracy against the optimizer step."""
        try:
            import matplotlib
        except ImportError:
            print("icrm: matplotlib is not installed; skipping training.png (pip install matplotlib)")
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.log_history if "loss" in r]
        if not rows:
            return None
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        steps = [r["step"] for r in rows]
        for key in ("loss", "bt_loss", "align_loss", "sft_loss"):
            if key in rows[0]:
                ax_loss.plot(steps, [r[key] for r in rows], label=key)
        ax_loss.set_xlabel("step"), ax_loss.set_title("training loss"), ax_loss.legend()
        if "accuracy" in rows[0]:
            ax_acc.plot(steps, [r["accuracy"] for r in rows], label="train (batch)")
            evals = [r for r in self.log_history if "eval_accuracy" in r]
            if evals:
                ax_acc.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="eval")
            ax_acc.set_ylim(0, 1), ax_acc.set_xlabel("step"), ax_acc.set_title("pairwise accuracy"), ax_acc.legend()
        fig.tight_layout()
        path = os.path.join(self.args.output_dir, "training.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    # --- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Write ``checkpoint-<step>`` atomically (tmp dir + rename) and keep the last k."""
        out = self.args.output_dir
        final = os.path.join(out, f"{CHECKPOINT_PREFIX}{self.global_step}")
        tmp = os.path.join(out, f"tmp-{CHECKPOINT_PREFIX}{self.global_step}")
        smooth = [self.smooth_weight]
        if self.world_size > 1:
            smooth = [None] * self.world_size
            dist.all_gather_object(smooth, self.smooth_weight)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self._barrier()
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save(rng, os.path.join(tmp, f"rng_state_{self.rank}.pt"))
        if self.is_main:
            save_file(self._model_state(), os.path.join(tmp, "model.safetensors"))
            self.tokenizer.save_pretrained(tmp)
            self.model.config.save_pretrained(tmp)
            self._write_model_meta(tmp)
            torch.save(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            torch.save(self.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            if self.scaler:
                torch.save(self.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
            state = {"global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "num_tokens": self.num_tokens, "smooth_weight": smooth, "world_size": self.world_size,
                     "log_history": self.log_history, "config": self.args.to_dict()}
            with open(os.path.join(tmp, TRAINER_STATE), "w") as fh:
                json.dump(state, fh, indent=1)
        self._barrier()
        if self.is_main:
            _fsync_tree(tmp)
            if os.path.exists(final):  # re-saving a step after resume: swap the old one out first
                trash = final + ".old"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash)
            else:
                os.replace(tmp, final)
            for old in list_checkpoints(out)[: -self.args.save_total_limit]:
                shutil.rmtree(old)
            for name in os.listdir(out):  # leftovers of a run killed mid-save
                if name.startswith(f"tmp-{CHECKPOINT_PREFIX}") or (name.startswith(CHECKPOINT_PREFIX) and name.endswith(".old")):
                    shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        self._barrier()
        return final

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _load_checkpoint(self, path: str) -> None:
        if path == "latest":
            found = list_checkpoints(self.args.output_dir)
            if not found:
                return  # nothing to resume: start fresh
            path = found[-1]
        if not os.path.exists(os.path.join(path, TRAINER_STATE)):
            raise ValueError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {TRAINER_STATE})")
        with open(os.path.join(path, TRAINER_STATE)) as fh:
            state = json.load(fh)
        self._load_model_state(load_file(os.path.join(path, "model.safetensors"), device=str(self.device)))
        self.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=self.device, weights_only=False))
        self.scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
        if self.scaler and os.path.exists(os.path.join(path, "scaler.pt")):
            self.scaler.load_state_dict(torch.load(os.path.join(path, "scaler.pt"), weights_only=False))
        self.global_step, self.epoch = state["global_step"], state["epoch"]
        self.batch_in_epoch, self.num_tokens = state["batch_in_epoch"], state["num_tokens"]
        self.log_history = list(state["log_history"])
        smooth = state["smooth_weight"]
        self.smooth_weight = smooth[self.rank] if len(smooth) == self.world_size else smooth[0]
        rng_path = os.path.join(path, f"rng_state_{self.rank}.pt")
        if os.path.exists(rng_path):
            rng = torch.load(rng_path, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


# ------------------------------------------------------------------------------------------

class RewardTrainer(_Trainer):
    """Train a :class:`~icrm.model.RewardModel` with the ICRM objective (or GRM / Bradley-Terry).

    Args:
        model: a ``RewardModel``, a path / ``"tiny"`` to build one, or None for ``args.model_name_or_path``.
        args: the :class:`~icrm.config.RewardConfig`.
        train_dataset / eval_dataset: a :class:`~icrm.data.PreferenceDataset`, a file path or a
            list of raw rows in any TRL preference layout; None for ``args.train_file`` / ``args.eval_file``.
        processing_class: the tokenizer (default: from ``args``).
        generator: the frozen :class:`~icrm.model.Generator` (default: ``args.generator_name_or_path``,
            else a copy of the starting model). Unused when ``reg_ratio == 0``.
    """

    def __init__(self, model=None, args: RewardConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, generator: Generator | None = None):
        args = args or RewardConfig()
        tokenizer = processing_class or load_tokenizer(args.tokenizer_name_or_path, args.model_name_or_path)
        if model is None or isinstance(model, str):
            model, generator = build_reward_model(args, tokenizer, model or args.model_name_or_path, generator)
        elif generator is None and args.reg_ratio > 0 and not args.uniform_weights:
            generator = Generator.from_reward_model(model, temperature=args.gen_temperature, backend=args.kernels)
        if train_dataset is None:
            train_dataset = args.train_file
        if eval_dataset is None and args.eval_file:
            eval_dataset = args.eval_file
        super().__init__(model, args, train_dataset, eval_dataset, tokenizer)
        needs_generator = args.reg_ratio > 0 and not args.uniform_weights
        self.generator = generator.to(self.device) if (generator is not None and needs_generator) else None

    def _loss(self, batch, training: bool):
        out, _, metrics = self._forward(batch, training)
        return out.loss, metrics

    def _forward(self, batch, training: bool):
        """-> ``(ICRMLoss, rewards [2B, T], metrics)``; updates the EMA S when training."""
        args = self.args
        labels, cu_seqlens = batch["labels"], batch.get("cu_seqlens")
        inputs = (batch["input_ids"], batch.get("attention_mask"))
        sft_targets = None
        if args.sft_regularizer and self.model.lm_head is not None:
            sft_targets = shifted_targets(labels, cu_seqlens)
            # The SFT term uses the chosen rows (segments) only.
            if cu_seqlens is None:
                sft_targets[labels.shape[0] // 2:] = IGNORE_INDEX
            else:
                sft_targets[0, cu_seqlens[(cu_seqlens.numel() - 1) // 2]:] = IGNORE_INDEX
        module = self.module if training else self.model
        rewards, sft_logp = module(*inputs, sft_targets, batch.get("position_ids"))
        gen_logp = None
        if self.generator is not None:
            gen_logp = self.generator(*inputs, labels, batch.get("position_ids"), cu_seqlens)
        if cu_seqlens is None:
            loss_inputs = (rewards, labels, gen_logp, None if sft_logp is None else sft_logp[:, :-1])
        else:
            loss_inputs = (rewards[0], labels[0], gen_logp, None if sft_logp is None else sft_logp[0])
        out = icrm_loss(
            *loss_inputs, smooth_weight=self.smooth_weight, training=training, reg_ratio=args.reg_ratio,
            weight_scale=args.weight_scale, kind=args.consistency_kind,
            baseline=args.baseline or ("row_mean" if cu_seqlens is None else "response_mean"),
            margin=batch.get("margin"), center_rewards_coefficient=args.center_rewards_coefficient,
            cu_seqlens=cu_seqlens, backend=args.kernels, uniform_weights=args.uniform_weights,
        )
        if training:
            self.smooth_weight = out.smooth_weight
        seq = out.sequence_rewards
        num_pairs = seq.shape[0] // 2
        margin = seq[:num_pairs] - seq[num_pairs:]
        metrics = {
            "loss": float(out.loss.detach()), "bt_loss": float(out.bt_loss.detach()), "align_loss": float(out.align_loss.detach()),
            "sft_loss": float(out.sft_loss.detach()), "omega": float(out.omega), "smooth_weight": out.smooth_weight,
            "accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
            "min_reward": float(seq.min()), "mean_reward": float(seq.mean()), "max_reward": float(seq.max()),
        }
        return out, rewards, metrics

    @torch.no_grad()
    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """Pairwise accuracy, mean margin, eval loss parts and reward statistics (``eval_`` prefix)."""
        batches = self._eval_batches(eval_dataset, collate_pairs)
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, float] = {}
        token_sum, token_sq, token_count, count = 0.0, 0.0, 0, 0
        for indices, batch in batches:
            count += len(indices)
            with self.autocast():
                _, rewards, metrics = self._forward(batch, training=False)
            on_response = batch["labels"] != IGNORE_INDEX
            token_sum += float(rewards[on_response].sum())
            token_sq += float((rewards[on_response].float() ** 2).sum())
            token_count += int(on_response.sum())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(indices)
        result = {f"eval_{k}": v / count for k, v in sums.items() if k not in ("smooth_weight", "min_reward", "max_reward")}
        mean_tok = token_sum / max(1, token_count)
        result["eval_token_reward_mean"] = mean_tok
        result["eval_token_reward_std"] = math.sqrt(max(0.0, token_sq / max(1, token_count) - mean_tok**2))
        result = self._reduce_mean(result)
        self.model.train(was_training)
        return result

    def _model_state(self):
        return self.model.trainable_state_dict()

    def _write_model_meta(self, directory: str) -> None:
        meta = {"value_head_bias": self.model.value_head_bias, "with_lm_head": self.model.lm_head is not None,
                "full": not getattr(self.model, "is_peft", False)}
        with open(os.path.join(directory, RM_CONFIG_NAME), "w") as fh:
            json.dump(meta, fh, indent=2)

    def _load_model_state(self, state):
        self.model.load_trainable_state_dict(state)

    def save_model(self, output_dir: str | None = None) -> str:
        """Save the reward model (full, LoRA merged) for ``icrm eval / score / export``."""
        output_dir = output_dir or os.path.join(self.args.output_dir, "final")
        if self.is_main:
            save_reward_model(self.model, self.tokenizer, output_dir, extra={"config": self.args.to_dict()})
        self._barrier()
        return output_dir


def build_reward_model(args: RewardConfig, tokenizer, name_or_path: str, generator: Generator | None = None):
    """``(RewardModel, Generator or None)`` from the config (seeded, so the same config gives the same init)."""
    causal_lm = load_causal_lm(name_or_path, tokenizer, seed=args.seed)
    if generator is None and args.reg_ratio > 0 and not args.uniform_weights:
        source = load_causal_lm(args.generator_name_or_path, tokenizer, seed=args.seed) \
            if args.generator_name_or_path else copy.deepcopy(causal_lm)
        generator = Generator(source, temperature=args.gen_temperature, backend=args.kernels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        rm = RewardModel(causal_lm, value_head_bias=args.value_head_bias, with_lm_head=args.sft_regularizer,
                         sft_grad_scale=args.sft_grad_scale, backend=args.kernels)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(rm.backbone)
    if args.use_peft:
        rm = apply_lora(rm, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    return rm, generator


# ------------------------------------------------------------------------------------------

class _CausalLMLogprobs(torch.nn.Module):
    """Per-token log-probs of ``labels[t+1]`` from a causal LM, without ``[B, T, V]`` logits."""

    def __init__(self, causal_lm, backend: str):
        super().__init__()
        self.causal_lm, self.backend = causal_lm, backend
        self.config = causal_lm.config

    @property
    def backbone(self):
        return decoder_of(self.causal_lm)

    def forward(self, input_ids, attention_mask, targets, position_ids=None):
        """``targets [R, T]`` = ``shifted_targets(labels)`` -> log-probs ``[R, T]`` (0 where ignored)."""
        hidden = last_hidden(self.backbone, input_ids, attention_mask, position_ids)
        head = self.causal_lm.get_output_embeddings()
        return linear_logprobs(hidden, head.weight.to(hidden.dtype), targets,
                               bias=None if head.bias is None else head.bias.to(hidden.dtype), backend=self.backend)


class SFTTrainer(_Trainer):
    """Fine-tune a causal LM on the chosen responses of preference data (the generator's SFT stage)."""

    collate = staticmethod(collate_sft)

    def __init__(self, model=None, args: RewardConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None):
        args = args or RewardConfig()
        tokenizer = processing_class or load_tokenizer(args.tokenizer_name_or_path, args.model_name_or_path)
        if model is None or isinstance(model, str):
            model = load_causal_lm(model or args.model_name_or_path, tokenizer, seed=args.seed)
        if args.gradient_checkpointing:
            enable_activation_checkpointing(model)
        super().__init__(_CausalLMLogprobs(model, args.kernels), args, train_dataset or args.train_file,
                         eval_dataset if eval_dataset is not None else (args.eval_file or None), tokenizer)

    def _token_logprobs(self, module, batch):
        """``(logp [R, T], mask [R, T])`` of the response tokens (padded or packed batch)."""
        targets = shifted_targets(batch["labels"], batch.get("cu_seqlens"))
        logp = module(batch["input_ids"], batch.get("attention_mask"), targets, batch.get("position_ids"))
        return logp, (targets != IGNORE_INDEX).float()

    def _loss(self, batch, training: bool):
        logp, mask = self._token_logprobs(self.module if training else self.model, batch)
        loss = -(logp * mask).sum() / mask.sum()
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """Mean token NLL of the chosen responses (``eval_loss``)."""
        batches = self._eval_batches(eval_dataset, collate_sft)
        self.model.eval()
        nll, count = 0.0, 0.0
        for _, batch in batches:
            with self.autocast():
                logp, mask = self._token_logprobs(self.model, batch)
            nll, count = nll - float((logp * mask).sum()), count + float(mask.sum())
        self.model.train()
        return self._reduce_mean({"eval_loss": nll / max(count, 1.0)})

    def _model_state(self):
        return {k: v.detach().contiguous().cpu() for k, v in self.model.causal_lm.state_dict().items()}

    def _load_model_state(self, state):
        self.model.causal_lm.load_state_dict(state)

    def save_model(self, output_dir: str | None = None) -> str:
        """Save as a Hugging Face causal-LM folder (+ tokenizer): the generator / RM init."""
        output_dir = output_dir or os.path.join(self.args.output_dir, "final")
        if self.is_main:
            self.model.causal_lm.save_pretrained(output_dir)
            self.tokenizer.save_pretrained(output_dir)
        self._barrier()
        return output_dir


# ------------------------------------------------------------------------------------------
# The README's main job

def sft_args(cfg: RewardConfig, output_dir: str) -> RewardConfig:
    """The generator-SFT stage's config derived from the main config."""
    return cfg.replace(output_dir=output_dir, max_steps=cfg.sft_max_steps, learning_rate=cfg.sft_learning_rate,
                       resume_from_checkpoint=cfg.resume_from_checkpoint and "latest")


def arm_config(cfg: RewardConfig, arm: str, **changes) -> RewardConfig:
    """``cfg`` with ``arm``'s objective (an ICRM arm keeps ``cfg.reg_ratio``, or the default 0.1 when it is 0)."""
    reg_ratio = cfg.reg_ratio or RewardConfig.__dataclass_fields__["reg_ratio"].default
    return cfg.replace(arm=arm, reg_ratio=reg_ratio if arm.startswith("icrm") else 0.0, **changes)


def train_arms(cfg: RewardConfig, arms: list[str], *, train_dataset=None, echo=print, save: bool = True,
               on_arm=None) -> dict:
    """[SFT the generator] -> one reward model per arm from the same init, each scored by
    :func:`icrm.metrics.evaluate_suite` on ``cfg``'s eval files. Returns ``{"sft": ..., arm: metrics}``;
    ``on_arm(arm, metrics)`` is called as each arm finishes (the study writes its rows there).

    Reward-model start (``reward_model_init``): ``generator`` = the SFT-ed model, ``base`` =
    ``model_name_or_path`` (the authors' recipe); the frozen generator is the SFT-ed model either way.
    """
    from .metrics import evaluate_suite

    base = cfg.model_name_or_path
    summary: dict = {}
    generator = cfg.generator_name_or_path
    if cfg.run_sft and cfg.sft_max_steps > 0:
        sft = SFTTrainer(args=sft_args(cfg, os.path.join(cfg.output_dir, "sft")), train_dataset=train_dataset)
        summary["sft"] = sft.train()
        generator = sft.save_model()
        echo(f"[sft] generator saved to {generator} (eval token NLL {summary['sft'].get('eval_loss', float('nan')):.3f})")
    init = generator if (cfg.reward_model_init == "generator" and generator) else base
    for arm in arms:
        # A checkpoint path given for the run belongs to the first arm; the others resume their own latest.
        stage = arm_config(cfg, arm, model_name_or_path=init, generator_name_or_path=generator,
                           output_dir=os.path.join(cfg.output_dir, arm),
                           resume_from_checkpoint=(cfg.resume_from_checkpoint if arm == arms[0]
                                                   else cfg.resume_from_checkpoint and "latest"))
        start = time.perf_counter()
        # eval_file=None: the trainer's own pairwise evaluation is part of evaluate_suite below.
        trainer = RewardTrainer(args=stage.replace(eval_file=None), train_dataset=train_dataset)
        result = trainer.train()
        if save:
            result["model_dir"] = trainer.save_model()
        result["train_s"] = time.perf_counter() - start
        if trainer.is_main:
            result.update(evaluate_suite(trainer.model, trainer.tokenizer, eval_file=cfg.eval_file,
                                         eval_long_file=cfg.eval_long_file, bon_file=cfg.bon_file,
                                         bon_long_file=cfg.bon_long_file, max_length=cfg.max_length,
                                         batch_size=cfg.per_device_eval_batch_size))
        summary[arm] = result
        if on_arm is not None:
            on_arm(arm, result)
        echo(f"[{arm}] {stage.arm_name()} trained in {result['train_s']:.0f} s")
    return summary


#: Rows of the main job's table: (metric key, label).
TABLE_ROWS = (
    ("pair_accuracy", "pairwise accuracy"), ("value_spearman", "Spearman(token reward, V)"),
    ("value_auroc", "AUROC reachable (V > 0)"), ("first_error_acc", "first-error localisation"),
    ("bon_accuracy", "best-of-16 correct"),
)


def metric_table(summary: dict, arms: list[str]) -> str:
    """One text table: a row per metric (held-out and longer inputs), a column per arm."""
    names = [ARMS[a][0] for a in arms]
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'':<34s}" + "".join(f"{n:>{width}s}" for n in names)]
    for suffix, title in (("", "held-out (4-8 numbers)"), ("_long", "longer inputs (9-12 numbers)")):
        keys = [(k + suffix, label) for k, label in TABLE_ROWS if any(k + suffix in summary.get(a, {}) for a in arms)]
        if not keys:
            continue
        lines.append(title)
        for key, label in keys:
            cells = "".join(f"{summary[a].get(key, float('nan')):>{width}.4f}" for a in arms)
            lines.append(f"  {label:<32s}{cells}")
        ref = next((summary[a] for a in arms if "bon_random" + suffix in summary[a]), None)
        if ref:
            lines.append(f"  {'(best-of-16: random pick / oracle)':<32s}{ref['bon_random' + suffix]:>{width}.4f}"
                         f"{ref['bon_oracle' + suffix]:>{width}.4f}")
    return "\n".join(lines)


def run_main_job(cfg: RewardConfig, *, echo=print) -> dict:
    """``icrm train``: [SFT the generator] -> a reward model per arm (``arm``, or ``arms`` when
    ``compare_bt``) from the same init, then one table of all metrics.

    Outputs: ``<output_dir>/sft/final`` (generator), ``<output_dir>/<arm>/final`` (reward
    models), each stage's ``metrics.jsonl`` and ``training.png``, and ``<output_dir>/summary.json``.
    """
    start = time.perf_counter()
    is_main = int(os.environ.get("RANK", "0")) == 0
    if not is_main:
        echo = lambda *_: None  # noqa: E731  (one copy of the report under torchrun)
    arms = list(cfg.arms) if cfg.compare_bt else [cfg.arm or "icrm"]
    summary: dict = {"config": cfg.to_dict(), **train_arms(cfg, arms, echo=echo)}
    summary["wall_s"] = time.perf_counter() - start
    echo(f"\n{metric_table(summary, arms)}\n  reward models start from the {cfg.reward_model_init}; "
         f"wall time {summary['wall_s']:.0f} s; outputs in {cfg.output_dir}")
    if is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


# ------------------------------------------------------------------------------------------
# `icrm eval` and `icrm score`

def evaluate_file(model_dir: str, eval_file: str, *, max_length: int, batch_size: int = 64, backend: str = "auto") -> dict:
    """Pairwise accuracy, mean margin, BT (+ SFT) loss and per-token reward statistics of a saved RM."""
    from .model import load_reward_model

    rm, tokenizer = load_reward_model(model_dir, backend=backend)
    args = RewardConfig(model_name_or_path=model_dir, eval_file=eval_file, max_length=max_length, reg_ratio=0.0,
                        sft_regularizer=rm.lm_head is not None, per_device_eval_batch_size=batch_size, kernels=backend,
                        output_dir=os.path.join(model_dir, "eval"))
    trainer = RewardTrainer(model=rm, args=args, eval_dataset=eval_file, processing_class=tokenizer)
    return trainer.evaluate()


def _score_inputs(row, tokenizer) -> list[tuple[str, str, str]]:
    """``[(name, prompt text, response text)]`` of one ``icrm score`` input row."""
    from .data import BadRow, normalize_row

    if isinstance(row, dict) and "response" in row:
        if not isinstance(row.get("prompt", ""), str) or not isinstance(row["response"], str) or not row["response"].strip():
            raise BadRow("'prompt' must be a string and 'response' a non-empty string")
        return [("response", row.get("prompt", ""), row["response"])]
    if isinstance(row, dict) and "messages" in row:
        msgs = row["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise BadRow("'messages' must end with an assistant message")
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        return [("response", prompt, full[len(prompt):])]
    prompt, chosen, rejected, _ = normalize_row(row, tokenizer)
    return [("chosen", prompt, chosen), ("rejected", prompt, rejected)]


@torch.no_grad()
def score_file(model_dir: str, input_file: str, output_file: str = "-", *, max_length: int, backend: str = "auto") -> int:
    """Write one JSON line per input row: ``<name>_reward`` and ``<name>_token_rewards`` (response tokens)."""
    import sys

    from .data import BadRow, read_rows, tokenize_pair
    from .model import load_reward_model

    rm, tokenizer = load_reward_model(model_dir, backend=backend)
    rm.eval()
    out = sys.stdout if output_file == "-" else open(output_file, "w")
    written = 0
    try:
        for index, row in enumerate(read_rows(input_file)):
            record = {"index": index}
            try:
                parts = _score_inputs(row, tokenizer)
            except BadRow as exc:
                record["error"] = str(exc)
                parts = []
            for name, prompt, response in parts:
                tokenized = tokenize_pair(prompt, response, tokenizer, max_length)
                if tokenized is None:
                    record["error"] = f"prompt does not fit max_length={max_length}"
                    continue
                ids, prompt_len, _ = tokenized
                rewards, _ = rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
                token_rewards = rewards[0, prompt_len:].tolist()
                record[f"{name}_reward"] = token_rewards[-1]
                record[f"{name}_token_rewards"] = token_rewards
                record[f"{name}_tokens"] = tokenizer.convert_ids_to_tokens(ids[prompt_len:])
            out.write(json.dumps(record) + "\n")
            written += 1
    finally:
        if out is not sys.stdout:
            out.close()
    return written
