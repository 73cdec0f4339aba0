"""A plain PyTorch training loop (nanoGPT-sized) for the reward model and the generator SFT.

``RewardTrainer`` is shaped like TRL's (``model``, ``args``, ``train_dataset``,
``eval_dataset``, ``processing_class``; ``.train()``, ``.evaluate()``, ``.save_model()``).
``SFTTrainer`` fine-tunes the generator on the chosen responses (the authors' first stage).
Both share :class:`_Trainer`: AdamW, warm-up + cosine/linear/constant schedule, gradient
accumulation and clipping, tqdm, ``metrics.jsonl``, a loss/accuracy PNG, DDP or
FSDP2 (``fsdp: true``) under ``torchrun``, and atomic checkpoints with exact resume.

Checkpoint ``checkpoint-<step>/``: ``model.safetensors`` (full weights, or with LoRA the
adapters + value head + head copy), ``config.json`` + tokenizer, ``optimizer.pt``,
``scheduler.pt``, ``rng_state_<rank>.pt``, ``trainer_state.json`` (step, epoch, batch
position, EMA S of every rank, log history) and ``checksums.json``, written last. It is
written into ``tmp-checkpoint-*`` and renamed into place, so a killed run never leaves a
partial ``checkpoint-<step>``; resume verifies the checksums and falls back to the newest
intact checkpoint (see :mod:`icrm.checkpoint`). A non-finite loss or gradient stops the run
(or skips the update with ``on_nonfinite: skip``); a non-finite model is never saved.

Checkpoints do not depend on the world size or on DDP vs FSDP2: the model is always one full
safetensors file (gathered from the shards under FSDP2) and the optimizer state is keyed by
parameter name (``torch.distributed.checkpoint.state_dict``), full tensors, so a run resumes
on any number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import resource
import shutil
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from icrm_kernels import linear_logprobs

from .checkpoint import (
    CHECKPOINT_PREFIX, TRAINER_STATE, checkpoint_step, list_checkpoints, prepare_output_dir, promote,
    remove_leftovers, resume_candidates, set_aside, verify_checkpoint, write_manifest,
)
from .config import ARMS, BUILTIN_MODEL, RewardConfig, resolve_steps
from .data import IGNORE_INDEX, PreferenceDataset, collate_pairs, collate_sft, epoch_batches
from .model import (
    RM_CONFIG_NAME, Generator, RewardModel, apply_lora, check_packing_support, decoder_of,
    enable_activation_checkpointing, fit_to_tokenizer, last_hidden, load_causal_lm, load_tokenizer, load_with_aliases,
    rebuild_reward_model, save_reward_model, save_tokenizer, shifted_targets, without_aliases,
)
from .io_safety import IcrmError, atomic_path, check_model_source, first_line, fsync_tree, refuse_same_file
from .objective import INITIAL_SMOOTH_WEIGHT, icrm_loss

log = logging.getLogger("icrm")


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


def _resumes_in(resume: str | None, output_dir: str) -> bool:
    """Whether ``resume`` continues the run in ``output_dir`` (then its files are this run's past)."""
    if not resume:
        return False
    if resume == "auto":  # with nothing to resume, 'auto' is a fresh run and follows its rules
        return bool(list_checkpoints(output_dir))
    if resume == "latest":
        return True
    return os.path.realpath(os.path.dirname(os.path.normpath(resume))) == os.path.realpath(output_dir)


def check_finite_model(model: torch.nn.Module) -> None:
    """Raise naming the first parameter holding NaN/inf: such a model is never saved."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise IcrmError(f"the model's {name} holds non-finite values; not saving it")


def lr_lambda(kind: str, warmup_steps: int, total_steps: int, num_cycles: float = 0.5, min_lr_rate: float = 0.0):
    """Linear warm-up, then ``kind``; ``num_cycles`` and ``min_lr_rate`` as in transformers' cosine schedules."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * min(1.0, progress))))
            return min_lr_rate + (1.0 - min_lr_rate) * cosine
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def shard_with_fsdp(model: torch.nn.Module, decoder: torch.nn.Module, compute_dtype: torch.dtype | None) -> None:
    """FSDP2 in place: one unit per decoder layer (its parameters are gathered just for that
    layer's forward and backward), then the root unit with everything else: embeddings, final
    norm, the value head and the LM-head copy. Every parameter is sharded over the ranks (dim 0).
    ``compute_dtype`` (CUDA bf16/fp16): the gathered parameters are cast to it, gradients are
    reduced in fp32 and the sharded master weights stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"fsdp: {type(decoder).__name__} has no `layers` ModuleList of decoder layers to shard")
    kwargs = {}
    if compute_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def _as_dataset(source, tokenizer, args: RewardConfig, name: str):
    if source is None or isinstance(source, PreferenceDataset):
        return source
    return PreferenceDataset(source, tokenizer, args.max_length, name=name, max_length_policy=args.max_length_policy)


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
        self.eval_dataset = _as_dataset(eval_dataset, tokenizer, args, "eval")
        amp_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self.module = self.model
        #: FSDP2 shards self.model in place (self.module is self.model); one process has nothing to shard.
        self.sharded = args.fsdp and self.world_size > 1
        if self.sharded:
            shard_with_fsdp(self.model, self.model.backbone, amp_dtype if self.device.type == "cuda" else None)
        elif self.world_size > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype and self.device.type == "cuda" \
            else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler("cuda") if args.fp16 and self.device.type == "cuda" else None
        if amp_dtype and self.device.type != "cuda":
            warnings.warn(f"{'bf16' if args.bf16 else 'fp16'}: true is ignored on {self.device.type}; training in fp32")
        self.tensorboard = None
        if args.report_to and "tensorboard" in args.report_to and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("report_to: tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.tensorboard = SummaryWriter(os.path.join(args.output_dir, "runs"))
        self.global_step, self.epoch, self.batch_in_epoch, self.num_tokens = 0, 0, 0, 0
        self.skipped_steps = 0  # optimizer updates dropped for a non-finite loss/gradient
        self._saved_step = None  # the step the newest checkpoint of this run (or its resume point) holds
        self.log_history: list[dict] = []
        self.smooth_weight = INITIAL_SMOOTH_WEIGHT

    # --- subclass hooks -----------------------------------------------------------------
    def _loss(self, batch, training: bool):
        raise NotImplementedError

    def _model_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _state_module(self) -> torch.nn.Module:
        """The module whose state ``model.safetensors`` holds (keys as :meth:`_model_state` gives them)."""
        raise NotImplementedError

    def save_model(self, output_dir: str | None = None) -> str:
        raise NotImplementedError

    def _write_model_meta(self, directory: str) -> None:
        """Extra files that make a checkpoint loadable on its own (none by default)."""

    # --- setup --------------------------------------------------------------------------
    @property
    def train_dataset(self):
        if self._train_dataset is None and self._train_source is not None:
            self._train_dataset = _as_dataset(self._train_source, self.tokenizer, self.args, "train")
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
        warmup = resolve_steps(self.args.warmup_steps, total_steps) if self.args.warmup_steps else \
            int(self.args.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.args.lr_scheduler_type, warmup, total_steps, **(self.args.lr_scheduler_kwargs or {}))
        )

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _eval_batches(self, eval_dataset, collate):
        """``(indices, device batch)`` over this rank's share of ``eval_dataset`` (or the trainer's)."""
        dataset = _as_dataset(eval_dataset, self.tokenizer, self.args, "eval") or self.eval_dataset
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
        resume = resume_from_checkpoint or args.resume_from_checkpoint
        # Every rank checks (same answer, no rank left waiting at a barrier); rank 0 deletes.
        prepare_output_dir(args.output_dir, resuming=_resumes_in(resume, args.output_dir),
                           overwrite=args.overwrite_output_dir, apply=self.is_main)
        self._barrier()
        if self.train_dataset is None:
            raise ValueError("train_dataset is None; pass one to the trainer")
        set_seed(args.seed)
        total_steps = self._total_steps()
        logging_steps, eval_steps, save_steps = (resolve_steps(getattr(args, f"{n}_steps"), total_steps)
                                                 for n in ("logging", "eval", "save"))
        self._build_optimizer(total_steps)
        if resume:
            self._load_checkpoint(resume)
        if self.is_main:  # the resumed history, once: replayed steps are not appended twice
            with atomic_path(os.path.join(args.output_dir, "metrics.jsonl")) as tmp, open(tmp, "w") as fh:
                fh.writelines(json.dumps(record) + "\n" for record in self.log_history)
        self.model.train()
        accum = args.gradient_accumulation_steps
        bar = tqdm(total=total_steps, initial=self.global_step, desc=type(self).__name__, disable=not self.is_main,
                   dynamic_ncols=True)
        window: dict[str, list[float]] = {}
        step_metrics: list[dict[str, float]] = []  # this optimizer step's micro-batches
        tokens_in_window, t_window = 0, time.perf_counter()
        micro, epochs_done = 0, self.epoch
        while self.global_step < total_steps:
            batches = self._batches(self.epoch)
            if self.batch_in_epoch >= len(batches):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                continue
            indices = batches[self.batch_in_epoch]
            batch = self._to_device(self.collate([self.train_dataset[i] for i in indices], self.tokenizer.pad_token_id,
                                                 packed=args.padding_free))
            if micro % accum == 0:
                smooth_before = self.smooth_weight  # restored if this update is skipped
            micro += 1
            last_micro = micro % accum == 0
            step_metrics.append(self.training_step(batch, accum=accum, sync=last_micro))
            self.batch_in_epoch += 1
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            tokens_in_window += tokens
            self.num_tokens += tokens * self.world_size
            if not last_micro:
                continue
            grad_norm = self._optimizer_step(all(math.isfinite(m["loss"]) for m in step_metrics))
            if grad_norm is None:
                self.smooth_weight = smooth_before
            else:
                for metrics in step_metrics:
                    for k, v in metrics.items():
                        window.setdefault(k, []).append(v)
            step_metrics = []
            self.global_step += 1
            bar.update(1)
            if self.global_step % logging_steps == 0 or self.global_step == total_steps:
                elapsed = time.perf_counter() - t_window
                record = {k: sum(v) / len(v) for k, v in window.items()}
                if grad_norm is not None:  # a skipped update has none (every rank skips together)
                    record["grad_norm"] = grad_norm
                record["tokens_per_s"] = tokens_in_window / max(elapsed, 1e-9)
                record = self._reduce_mean(record)
                record["tokens_per_s"] *= self.world_size
                record.update(step=self.global_step, epoch=self.epoch + self.batch_in_epoch / max(1, len(batches)),
                              lr=self.scheduler.get_last_lr()[0], num_tokens=self.num_tokens,
                              peak_mem_gb=peak_memory_gb(self.device))
                if self.skipped_steps:
                    record["skipped_steps"] = self.skipped_steps
                self._log(record)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "accuracy") if k in record})
                window, tokens_in_window, t_window = {}, 0, time.perf_counter()
            # An epoch may end inside an accumulation window; the step that completes it counts.
            epoch_end = math.floor(self.epoch + self.batch_in_epoch / len(batches)) > epochs_done
            epochs_done += int(epoch_end)
            if self.eval_dataset is not None and (
                (args.eval_strategy == "steps" and eval_steps and self.global_step % eval_steps == 0)
                    or (args.eval_strategy == "epoch" and epoch_end)):
                self._log({"step": self.global_step, **self.evaluate()})
            if (args.save_strategy == "steps" and save_steps and self.global_step % save_steps == 0) \
                    or (args.save_strategy == "epoch" and epoch_end):
                self.save_checkpoint()
        bar.close()
        if args.save_strategy != "no" and self._saved_step != self.global_step:
            self.save_checkpoint()
        result = {"step": self.global_step}
        if self.skipped_steps:
            result["skipped_steps"] = self.skipped_steps
        if self.eval_dataset is not None:
            result.update(self.evaluate())
            self._log({"step": self.global_step, **result})
        if self.is_main:
            self.plot()
        return result

    def training_step(self, batch: dict, accum: int = 1, sync: bool = True) -> dict[str, float]:
        """Forward and backward of one micro-batch (on the device): autocast, the loss divided by
        ``accum`` (and scaled under fp16), DDP/FSDP gradient sync only when ``sync``. Returns its metrics.

        One optimizer step of the loop is ``accum`` of these, then :meth:`_optimizer_step`.
        """
        if self.sharded:
            self.model.set_requires_gradient_sync(sync)
        ctx = contextlib.nullcontext() if sync or self.world_size == 1 or self.sharded else self.module.no_sync()
        with ctx:
            with self.autocast():
                loss, metrics = self._loss(batch, training=True)
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return metrics

    def _optimizer_step(self, loss_finite: bool = True) -> float | None:
        """Clip, step, schedule; the gradient norm, or None when the update was skipped
        (``on_nonfinite: skip``) for a non-finite loss or gradient."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if isinstance(grad_norm, DTensor):  # FSDP2: the norm over all shards
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        # Under fp16 the scaler skips inf/NaN gradients by design; only the loss is checked there.
        finite = loss_finite and (self.scaler is not None or math.isfinite(grad_norm))
        if self.world_size > 1:  # losses are per rank: every rank must take the same decision
            flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
            dist.all_reduce(flag)
            finite = float(flag) == 0.0
        if not finite:
            step = self.global_step + 1
            if self.args.on_nonfinite == "error":
                newest = list_checkpoints(self.args.output_dir)
                raise IcrmError(
                    f"non-finite loss or gradient at step {step} (grad_norm {grad_norm}); stopped before the update, "
                    f"nothing saved from it (newest checkpoint: {newest[-1] if newest else 'none'}). Lower "
                    "learning_rate, check the data, or set on_nonfinite: skip")
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()  # the schedule follows the step count, skipped or not
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d so far)", step, self.skipped_steps)
            return None
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
            with open(os.path.join(self.args.output_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key if key.startswith("eval_") else f"train/{key}", value, record["step"])
            self.tensorboard.flush()

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
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        return path

    # --- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Write ``checkpoint-<step>`` atomically (tmp dir, manifest last, rename) and keep the last k."""
        check_finite_model(self.model)
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
        model_state = self._gathered_model_state()
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=self._state_options(saving=True))
        if self.is_main:
            save_file(without_aliases(model_state), os.path.join(tmp, "model.safetensors"))
            save_tokenizer(self.tokenizer, tmp)
            self.model.config.save_pretrained(tmp)
            self._write_model_meta(tmp)
            torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
            torch.save(self.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            if self.scaler:
                torch.save(self.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
            state = {"global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "num_tokens": self.num_tokens, "smooth_weight": smooth, "world_size": self.world_size,
                     "skipped_steps": self.skipped_steps, "log_history": self.log_history, "config": self.args.to_dict()}
            with open(os.path.join(tmp, TRAINER_STATE), "w") as fh:
                json.dump(state, fh, indent=1)
        self._barrier()
        if self.is_main:
            write_manifest(tmp)  # last: a checkpoint with a valid manifest is complete
            fsync_tree(tmp)
            promote(tmp, final)
            for old in list_checkpoints(out)[: -self.args.save_total_limit]:
                shutil.rmtree(old)
            remove_leftovers(out)
        self._saved_step = self.global_step
        self._barrier()
        return final

    def _state_options(self, saving: bool) -> StateDictOptions:
        """Under FSDP2: full (gathered) tensors, kept on rank 0's CPU when saving; else the module's own."""
        return StateDictOptions(full_state_dict=True, cpu_offload=saving) if self.sharded else StateDictOptions()

    def _gathered_model_state(self) -> dict[str, torch.Tensor]:
        """The full model state on rank 0 (``{}`` elsewhere). Every rank calls it: under FSDP2 it
        gathers the shards, one tensor at a time, onto rank 0's CPU."""
        if self.sharded:
            return get_model_state_dict(self._state_module(), options=self._state_options(saving=True))
        return self._model_state() if self.is_main else {}

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _load_checkpoint(self, resume: str) -> str | None:
        """Restore from ``resume`` (a folder, ``latest`` or ``auto``); the folder used, or None.

        A checkpoint whose manifest or files do not check out is named in a warning and the
        next older one is tried; with none intact the run stops.
        """
        damaged = []
        for path in resume_candidates(resume, self.args.output_dir):
            problem = verify_checkpoint(path)
            if problem is None:
                try:
                    loaded = self._read_checkpoint(path)
                except IcrmError as exc:
                    problem = str(exc)
            if problem is not None:
                damaged.append((path, problem))
                log.warning("checkpoint %s is damaged: %s", path, problem)
                continue
            if damaged:
                log.warning("resuming from %s, the newest intact checkpoint", path)
            self._barrier()  # every rank has read its files before any is moved
            if self.is_main:
                for bad, _ in damaged:  # kept for inspection; never listed, rotated or resumed again
                    set_aside(bad, "damaged-")
            self._apply_checkpoint(path, loaded)
            return path
        if damaged:
            hint = "" if resume in ("latest", "auto") else " (resume_from_checkpoint latest tries the older ones)"
            raise IcrmError("no intact checkpoint to resume from: " + "; ".join(f"{p}: {why}" for p, why in damaged) + hint)
        return None

    def _read_checkpoint(self, path: str) -> dict:
        """Every file of a checkpoint, read before anything is restored; a bad one is named."""

        def read(name, loader):
            full = os.path.join(path, name)
            try:
                return loader(full)
            except Exception as exc:  # noqa: BLE001  (any reader failure means a damaged file)
                raise IcrmError(f"{full} cannot be read ({first_line(exc)})") from None

        def load_json(full):
            with open(full) as fh:
                return json.load(fh)

        state = read(TRAINER_STATE, load_json)
        missing = {"global_step", "epoch", "batch_in_epoch", "num_tokens", "smooth_weight", "log_history"} - set(state)
        if missing:
            raise IcrmError(f"{os.path.join(path, TRAINER_STATE)} lacks {sorted(missing)}")
        model = read("model.safetensors", lambda f: load_file(f, device=str(self.device)))
        bad = [k for k, v in model.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise IcrmError(f"{os.path.join(path, 'model.safetensors')} holds non-finite values in {bad[0]}")
        loaded = {"state": state, "model": model,
                  "optimizer": read("optimizer.pt", lambda f: torch.load(f, map_location=self.device, weights_only=False)),
                  "scheduler": read("scheduler.pt", lambda f: torch.load(f, weights_only=False))}
        for key, name in (("scaler", "scaler.pt"), ("rng", f"rng_state_{self.rank}.pt")):
            if os.path.exists(os.path.join(path, name)):
                loaded[key] = read(name, lambda f: torch.load(f, weights_only=False))
        return loaded

    def _apply_checkpoint(self, path: str, loaded: dict) -> None:
        try:
            if self.sharded:  # every rank read the full file; each keeps its shards
                set_model_state_dict(self._state_module(), loaded["model"], options=self._state_options(saving=False))
            else:
                self._load_model_state(loaded["model"])
            set_optimizer_state_dict(self.model, self.optimizer, loaded["optimizer"],
                                     options=self._state_options(saving=False))
            self.scheduler.load_state_dict(loaded["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise IcrmError(f"checkpoint {path} does not fit this model/config: {first_line(exc)}") from None
        if self.scaler and "scaler" in loaded:
            self.scaler.load_state_dict(loaded["scaler"])
        state = loaded["state"]
        self.global_step, self.epoch = state["global_step"], state["epoch"]
        self.batch_in_epoch, self.num_tokens = state["batch_in_epoch"], state["num_tokens"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.log_history = list(state["log_history"])
        smooth = state["smooth_weight"]
        self.smooth_weight = smooth[self.rank] if len(smooth) == self.world_size else smooth[0]
        if "rng" in loaded:
            rng = loaded["rng"]
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        if os.path.realpath(os.path.dirname(os.path.normpath(path))) == os.path.realpath(self.args.output_dir):
            self._saved_step = self.global_step  # that checkpoint is already in output_dir
            # Newer checkpoints belong to the timeline this resume abandons: `latest` must not
            # pick them after a later kill, and they must not be rotated as if they were ours.
            for newer in list_checkpoints(self.args.output_dir):
                if checkpoint_step(newer) > self.global_step and self.is_main:
                    set_aside(newer, "superseded-")


# ------------------------------------------------------------------------------------------

class RewardTrainer(_Trainer):
    """Train a :class:`~icrm.model.RewardModel` with the ICRM objective (or GRM / Bradley-Terry).

    Args:
        model: a ``RewardModel``; a Hugging Face causal LM or ``<Arch>ForSequenceClassification`` object
            (wrapped like a folder of that kind: trained in place, a classifier's ``score`` kept);
            a path / ``"tiny"`` to build one; or None for ``args.model_name_or_path``.
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
        # Like TRL, a model given without a tokenizer brings its own (a path's, an object's name_or_path).
        model_path = model if isinstance(model, str) else getattr(model, "name_or_path", None) or args.model_name_or_path
        tokenizer = processing_class or load_tokenizer(args.tokenizer_name_or_path, model_path)
        if model is None or not isinstance(model, RewardModel):
            model, generator = build_reward_model(args, tokenizer, model or args.model_name_or_path, generator)
        elif generator is None and args.uses_generator:
            generator = Generator.from_reward_model(model, temperature=args.gen_temperature, backend=args.kernels)
        if train_dataset is None:
            train_dataset = args.train_file
        if eval_dataset is None and args.eval_file:
            eval_dataset = args.eval_file
        super().__init__(model, args, train_dataset, eval_dataset, tokenizer)
        needs_generator = args.uses_generator
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
        rewards, sft_logp = module(*inputs, sft_targets, batch.get("position_ids"), cu_seqlens)
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

    def _state_module(self):
        return self.model

    def save_model(self, output_dir: str | None = None) -> str:
        """Save the reward model (full, LoRA merged) for ``icrm eval / score / export``; under FSDP2
        the shards are gathered into an unsharded copy on rank 0 first."""
        output_dir = output_dir or os.path.join(self.args.output_dir, "final")
        check_finite_model(self.model)
        state = self._gathered_model_state() if self.sharded else None
        if self.is_main:
            model = self.model if state is None else rebuild_reward_model(
                self.model.config, state, value_head_bias=self.model.value_head_bias,
                with_lm_head=self.model.lm_head is not None, sft_grad_scale=self.model.sft_grad_scale,
                backend=self.model.backend,
            )
            with atomic_path(output_dir, directory=True) as tmp:
                save_reward_model(model, self.tokenizer, tmp, extra={"config": self.args.to_dict()})
        self._barrier()
        return output_dir


def build_reward_model(args: RewardConfig, tokenizer, name_or_path, generator: Generator | None = None):
    """``(RewardModel, Generator or None)`` from the config (seeded, so the same config gives the same init).

    ``name_or_path``: what :func:`~icrm.model.load_causal_lm` takes, or such a model object.
    """
    if isinstance(name_or_path, torch.nn.Module):
        causal_lm = name_or_path
        fit_to_tokenizer(causal_lm, tokenizer)
    else:
        causal_lm = load_causal_lm(name_or_path, tokenizer, seed=args.seed)
    if generator is None and args.uses_generator:
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

    def forward(self, input_ids, attention_mask, targets, position_ids=None, cu_seqlens=None):
        """``targets [R, T]`` = ``shifted_targets(labels)`` -> log-probs ``[R, T]`` (0 where ignored)."""
        hidden = last_hidden(self.backbone, input_ids, attention_mask, position_ids, cu_seqlens)
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
        logp = module(batch["input_ids"], batch.get("attention_mask"), targets, batch.get("position_ids"),
                      batch.get("cu_seqlens"))
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
        load_with_aliases(self.model.causal_lm, state)

    def _state_module(self):
        return self.model.causal_lm

    def save_model(self, output_dir: str | None = None) -> str:
        """Save as a Hugging Face causal-LM folder (+ tokenizer): the generator / RM init (under
        FSDP2 from the state gathered onto rank 0)."""
        output_dir = output_dir or os.path.join(self.args.output_dir, "final")
        check_finite_model(self.model)
        state = self._gathered_model_state() if self.sharded else None
        if self.is_main:
            with atomic_path(output_dir, directory=True) as tmp:
                self.model.causal_lm.save_pretrained(tmp, state_dict=state)
                save_tokenizer(self.tokenizer, tmp)
        self._barrier()
        return output_dir


# ------------------------------------------------------------------------------------------
# The README's main job

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
    from .metrics import evaluate_suite
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


#: Rows of the main job's table: (metric key, label).
TABLE_ROWS = (
    ("pair_accuracy", "pairwise accuracy"), ("value_spearman", "Spearman(token reward, V)"),
    ("value_auroc", "AUROC reachable (V > 0)"), ("first_error_acc", "first-error localisation"),
    ("bon_accuracy", "best-of-16 correct (distinct)"),
)


def metric_table(summary: dict, arms: list[str], names: list[str] | None = None) -> str:
    """One text table: a row per metric (held-out and longer inputs), a column per arm (``names``:
    the column titles, default the arms' printed names)."""
    names = names or [ARMS[a][0] for a in arms]
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'':<34s}" + "".join(f"{n:>{width}s}" for n in names)]
    for suffix, title in (("", "held-out (eval_file, bon_file)"), ("_long", "longer inputs (eval_long_file, bon_long_file)")):
        keys = [(k + suffix, label) for k, label in TABLE_ROWS if any(k + suffix in summary.get(a, {}) for a in arms)]
        if not keys:
            continue
        lines.append(title)
        for key, label in keys:
            cells = "".join(f"{summary[a].get(key, float('nan')):>{width}.4f}" for a in arms)
            lines.append(f"  {label:<32s}{cells}")
        ref = next((summary[a] for a in arms if "first_error_chance" + suffix in summary[a]), None)
        if ref:
            lines.append(f"  {'(first error: chance)':<32s}{ref['first_error_chance' + suffix]:>{width}.4f}")
        ref = next((summary[a] for a in arms if "bon_random" + suffix in summary[a]), None)
        if ref:
            lines.append(f"  {'(best-of-N: random / oracle)':<32s}{ref['bon_random' + suffix]:>{width}.4f}"
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
    # Before any model is built: the folder is usable, holds no other run, the paths make sense.
    resume = cfg.resume_from_checkpoint
    prepare_output_dir(cfg.output_dir, resuming=bool(resume),
                       overwrite=cfg.overwrite_output_dir, apply=is_main)
    arms = list(cfg.arms) if cfg.compare_bt else [cfg.arm or "icrm"]
    stages = ("sft", *arms)
    if resume == "latest" and not any(list_checkpoints(os.path.join(cfg.output_dir, s)) for s in stages):
        raise IcrmError(f"resume_from_checkpoint latest: no checkpoint in {cfg.output_dir}/{{{','.join(stages)}}} "
                        "(use 'auto' to resume when there is one and start fresh otherwise)")
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


# ------------------------------------------------------------------------------------------
# `icrm eval` and `icrm score`

def evaluate_file(model_dir: str, eval_file: str, *, max_length: int, batch_size: int = 64, backend: str = "auto",
                  bon_file: str | None = None) -> dict:
    """Pairwise accuracy, mean margin, BT (+ SFT) loss and per-token reward statistics of a saved RM;
    with prefix values in ``eval_file`` also the process metrics, with ``bon_file`` best-of-N
    (:mod:`icrm.metrics`; those keys carry no ``eval_`` prefix)."""
    from .data import read_rows
    from .metrics import best_of_n, evaluate_process, has_prefix_values
    from .model import load_reward_model

    rm, tokenizer = load_reward_model(model_dir, backend=backend)
    args = RewardConfig(model_name_or_path=model_dir, eval_file=eval_file, max_length=max_length, reg_ratio=0.0,
                        sft_regularizer=rm.lm_head is not None, per_device_eval_batch_size=batch_size, kernels=backend,
                        output_dir=os.path.join(model_dir, "eval"))
    trainer = RewardTrainer(model=rm, args=args, eval_dataset=eval_file, processing_class=tokenizer)
    result = trainer.evaluate()
    rows = read_rows(eval_file)
    if has_prefix_values(rows):
        result.update(evaluate_process(trainer.model, tokenizer, rows, max_length=max_length, batch_size=batch_size))
    if bon_file:
        result.update(best_of_n(trainer.model, tokenizer, bon_file, max_length=max_length, batch_size=batch_size))
    return result


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

    refuse_same_file(input_file, output_file)
    rows = read_rows(input_file)  # a missing or malformed input fails here, before any output exists
    rm, tokenizer = load_reward_model(model_dir, backend=backend)
    rm.eval()
    written = 0
    with contextlib.ExitStack() as stack:
        if output_file == "-":
            out = sys.stdout
        else:  # written beside the target, renamed into place only when every row is done
            out = stack.enter_context(open(stack.enter_context(atomic_path(output_file)), "w"))
        for index, row in enumerate(rows):
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
    return written
