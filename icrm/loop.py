"""The training loop both trainers share (nanoGPT-sized): AdamW, warm-up + cosine/linear/constant
schedule, gradient accumulation and clipping, tqdm, ``metrics.jsonl`` and ``training.png``
(:mod:`icrm.reporting`), DDP or FSDP2 under ``torchrun`` (:mod:`icrm.distributed`), atomic
checkpoints with exact resume (:mod:`icrm.checkpoint`), and a clean stop on Ctrl-C / SIGTERM.

Subclasses (:mod:`icrm.trainers`) give the loss of a batch and the model's save/load.

Checkpoint ``checkpoint-<step>/``: ``model.safetensors`` (full weights, or with LoRA the
adapters + value head + head copy), ``config.json`` + tokenizer, ``optimizer.pt``,
``scheduler.pt``, ``rng_state_<rank>.pt``, ``trainer_state.json`` (step, epoch, batch
position, EMA S of every rank, log history) and ``checksums.json``, written last. It is
written into ``tmp-checkpoint-*`` and renamed into place, so a killed run never leaves a
partial ``checkpoint-<step>``; resume verifies the checksums and falls back to the newest
intact checkpoint. A full disk ends the run with one line naming the folder, the partial
folder removed. A non-finite loss or gradient stops the run (or skips the update with
``on_nonfinite: skip``); a non-finite model is never saved.

Checkpoints do not depend on the world size or on DDP vs FSDP2: the model is always one full
safetensors file (gathered from the shards under FSDP2) and the optimizer state is keyed by
parameter name (``torch.distributed.checkpoint.state_dict``), full tensors, so a run resumes
on any number of processes.

Ctrl-C (SIGINT) or SIGTERM during training: the step under way finishes, a checkpoint is
written, and :class:`TrainingInterrupted` says how to continue
(``--resume_from_checkpoint latest``); a second Ctrl-C stops at once, without one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from .checkpoint import (
    checkpoint_paths, checkpoint_step, checkpoint_writing, finish_checkpoint, list_checkpoints, newest_intact,
    prepare_output_dir, read_checkpoint, restore_rng_state, rng_state, set_aside, write_checkpoint_files,
)
from .config import RewardConfig, resolve_steps
from .data import PreferenceDataset, collate_pairs, epoch_batches
from .distributed import (
    any_rank, barrier, gather_objects, init_distributed, reduce_mean, shard_with_fsdp, state_options,
)
from .io_safety import IcrmError, first_line
from .model import check_packing_support
from .objective import INITIAL_SMOOTH_WEIGHT
from .reporting import RunLog, peak_memory_gb, plot_training

log = logging.getLogger("icrm")


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


def check_finite_model(model: torch.nn.Module) -> None:
    """Raise naming the first parameter holding NaN/inf: such a model is never saved."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise IcrmError(f"the model's {name} holds non-finite values; not saving it")


def resumes_in(resume: str | None, output_dir: str) -> bool:
    """Whether ``resume`` continues the run in ``output_dir`` (then its files are this run's past)."""
    if not resume:
        return False
    if resume == "auto":  # with nothing to resume, 'auto' is a fresh run and follows its rules
        return bool(list_checkpoints(output_dir))
    if resume == "latest":
        return True
    return os.path.realpath(os.path.dirname(os.path.normpath(resume))) == os.path.realpath(output_dir)


def as_dataset(source, tokenizer, args: RewardConfig, name: str):
    if source is None or isinstance(source, PreferenceDataset):
        return source
    return PreferenceDataset(source, tokenizer, args.max_length, name=name, max_length_policy=args.max_length_policy)


def default_pad_token(tokenizer) -> None:
    """A tokenizer without a pad token pads with its EOS, as TRL's ``RewardTrainer`` does (padding is
    masked and rewards are read at the last label token, so the pad id's value never matters)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"processing_class {type(tokenizer).__name__} has neither a pad nor an EOS token; "
                             "set tokenizer.pad_token before building the trainer")
        log.warning("processing_class has no pad token; padding with its EOS token %r (as TRL does)", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token


class TrainingInterrupted(IcrmError):
    """Training stopped on SIGINT / SIGTERM after a finished step; ``signum`` is the signal
    (``icrm`` exits with 128 + signum: 130 for Ctrl-C, as a shell does)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def stop_requests():
    """Yield a list that receives the signal number when SIGINT or SIGTERM arrives; the loop
    checks it after each optimizer step. A second signal is not caught (Ctrl-C again raises
    ``KeyboardInterrupt`` at once). Outside the main thread signals cannot be caught: nothing
    is installed there."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    caught = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in caught}

    def handler(signum, frame):
        received.append(signum)
        for s in caught:
            signal.signal(s, previous[s])
        log.warning("%s: finishing this step and saving a checkpoint (press Ctrl-C again to stop at once, "
                    "without one)", signal.Signals(signum).name)

    for s in caught:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s in caught:
            signal.signal(s, previous[s])


class BaseTrainer:
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
        self.eval_dataset = as_dataset(eval_dataset, tokenizer, args, "eval")
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
        self.run_log = RunLog(args.output_dir, args.report_to, self.is_main)
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
            self._train_dataset = as_dataset(self._train_source, self.tokenizer, self.args, "train")
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
        dataset = as_dataset(eval_dataset, self.tokenizer, self.args, "eval") or self.eval_dataset
        if dataset is None:
            raise ValueError("no eval_dataset given")
        pad, packed = self.tokenizer.pad_token_id, self.args.padding_free
        batches = epoch_batches(len(dataset), self.args.per_device_eval_batch_size, seed=0, epoch=0,
                                rank=self.rank, world_size=self.world_size, shuffle=False)
        # Resolved eagerly (a missing dataset raises here, before any mode change); batches lazily.
        return ((indices, self._to_device(collate([dataset[i] for i in indices], pad, packed=packed)))
                for indices in batches)

    def _reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        return reduce_mean(metrics, self.world_size, self.device)

    def _barrier(self) -> None:
        barrier(self.world_size)

    # --- the loop -----------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | None = None) -> dict:
        args = self.args
        resume = resume_from_checkpoint or args.resume_from_checkpoint
        # Every rank checks (same answer, no rank left waiting at a barrier); rank 0 deletes.
        prepare_output_dir(args.output_dir, resuming=resumes_in(resume, args.output_dir),
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
        self.run_log.restart(self.log_history)
        self.model.train()
        accum = args.gradient_accumulation_steps
        window: dict[str, list[float]] = {}
        step_metrics: list[dict[str, float]] = []  # this optimizer step's micro-batches
        tokens_in_window, t_window = 0, time.perf_counter()
        micro, epochs_done = 0, self.epoch
        # The bar is closed (its line ended) before any error or stop message is printed.
        with stop_requests() as stop, tqdm(total=total_steps, initial=self.global_step, desc=type(self).__name__,
                                           disable=not self.is_main, dynamic_ncols=True) as bar:
            while self.global_step < total_steps:
                batches = self._batches(self.epoch)
                if self.batch_in_epoch >= len(batches):
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    continue
                indices = batches[self.batch_in_epoch]
                batch = self._to_device(self.collate([self.train_dataset[i] for i in indices],
                                                     self.tokenizer.pad_token_id, packed=args.padding_free))
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
                if any_rank(bool(stop), self.world_size, self.device) and self.global_step < total_steps:
                    self._stop(stop[0] if stop else signal.SIGTERM, total_steps)
        if args.save_strategy != "no" and self._saved_step != self.global_step:
            self.save_checkpoint()
        result = {"step": self.global_step}
        if self.skipped_steps:
            result["skipped_steps"] = self.skipped_steps
        if self.eval_dataset is not None:
            result.update(self.evaluate())
            self._log({"step": self.global_step, **result})
        if self.is_main:
            plot_training(self.log_history, os.path.join(self.args.output_dir, "training.png"))
        return result

    def _stop(self, signum: int, total_steps: int):
        """After a stop request: checkpoint the finished step and raise :class:`TrainingInterrupted`."""
        where = f"interrupted by {signal.Signals(signum).name} at step {self.global_step}/{total_steps}"
        if self.args.save_strategy == "no":
            raise TrainingInterrupted(f"{where}; nothing saved (save_strategy: no); rerun with "
                                      "--overwrite_output_dir true to start again", signum)
        saved = self.save_checkpoint() if self._saved_step != self.global_step else \
            checkpoint_paths(self.args.output_dir, self.global_step)[1]
        raise TrainingInterrupted(f"{where}; checkpoint saved to {saved}; to continue, rerun the same command with "
                                  "--resume_from_checkpoint latest", signum)

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
        # Losses are per rank: every rank must take the same decision.
        finite = not any_rank(not finite, self.world_size, self.device)
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
        self.run_log.append(record)

    # --- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Write ``checkpoint-<step>`` atomically (tmp dir, manifest last, rename) and keep the last k."""
        check_finite_model(self.model)
        tmp, final = checkpoint_paths(self.args.output_dir, self.global_step)
        smooth = gather_objects(self.smooth_weight, self.world_size)
        with checkpoint_writing(tmp, final):
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            self._barrier()
            torch.save(rng_state(), os.path.join(tmp, f"rng_state_{self.rank}.pt"))
            model_state = self._gathered_model_state()
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer,
                                                       options=state_options(self.sharded, saving=True))
            if self.is_main:
                state = {"global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                         "num_tokens": self.num_tokens, "smooth_weight": smooth, "world_size": self.world_size,
                         "skipped_steps": self.skipped_steps, "log_history": self.log_history,
                         "config": self.args.to_dict()}
                write_checkpoint_files(tmp, model_state=model_state, tokenizer=self.tokenizer, config=self.model.config,
                                       optimizer_state=optimizer_state, scheduler_state=self.scheduler.state_dict(),
                                       scaler_state=self.scaler.state_dict() if self.scaler else None,
                                       trainer_state=state, write_meta=self._write_model_meta)
            self._barrier()
            if self.is_main:
                finish_checkpoint(tmp, final, self.args.save_total_limit)
        self._saved_step = self.global_step
        self._barrier()
        return final

    def _gathered_model_state(self) -> dict[str, torch.Tensor]:
        """The full model state on rank 0 (``{}`` elsewhere). Every rank calls it: under FSDP2 it
        gathers the shards, one tensor at a time, onto rank 0's CPU."""
        if self.sharded:
            return get_model_state_dict(self._state_module(), options=state_options(True, saving=True))
        return self._model_state() if self.is_main else {}

    def _load_checkpoint(self, resume: str) -> str | None:
        """Restore from ``resume`` (a folder, ``latest`` or ``auto``); the folder used, or None.

        A checkpoint whose manifest or files do not check out is named in a warning and the
        next older one is tried; with none intact the run stops.
        """
        path, loaded, damaged = newest_intact(resume, self.args.output_dir,
                                              lambda p: read_checkpoint(p, self.device, self.rank))
        if path is None:
            if damaged:
                hint = "" if resume in ("latest", "auto") else " (resume_from_checkpoint latest tries the older ones)"
                raise IcrmError("no intact checkpoint to resume from: "
                                + "; ".join(f"{p}: {why}" for p, why in damaged) + hint)
            return None
        if damaged:
            log.warning("resuming from %s, the newest intact checkpoint", path)
        self._barrier()  # every rank has read its files before any is moved
        if self.is_main:
            for bad, _ in damaged:  # kept for inspection; never listed, rotated or resumed again
                set_aside(bad, "damaged-")
        self._apply_checkpoint(path, loaded)
        return path

    def _apply_checkpoint(self, path: str, loaded: dict) -> None:
        try:
            if self.sharded:  # every rank read the full file; each keeps its shards
                set_model_state_dict(self._state_module(), loaded["model"], options=state_options(True, saving=False))
            else:
                self._load_model_state(loaded["model"])
            set_optimizer_state_dict(self.model, self.optimizer, loaded["optimizer"],
                                     options=state_options(self.sharded, saving=False))
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
            restore_rng_state(loaded["rng"])
        if os.path.realpath(os.path.dirname(os.path.normpath(path))) == os.path.realpath(self.args.output_dir):
            self._saved_step = self.global_step  # that checkpoint is already in output_dir
            # Newer checkpoints belong to the timeline this resume abandons: `latest` must not
            # pick them after a later kill, and they must not be rotated as if they were ours.
            for newer in list_checkpoints(self.args.output_dir):
                if checkpoint_step(newer) > self.global_step and self.is_main:
                    set_aside(newer, "superseded-")
