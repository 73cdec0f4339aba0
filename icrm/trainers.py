"""The two trainers on the shared loop (:mod:`icrm.loop`).

``RewardTrainer`` is shaped like TRL's (``model``, ``args``, ``train_dataset``,
``eval_dataset``, ``processing_class``; ``.train()``, ``.evaluate()``, ``.save_model()``) and
trains a :class:`~icrm.model.RewardModel` with the ICRM objective (or GRM / Bradley-Terry).
``SFTTrainer`` fine-tunes the generator on the chosen responses (the authors' first stage)
through :class:`~icrm.model.CausalLMLogprobs`, the log-prob path the frozen generator uses too.
"""

from __future__ import annotations

import copy
import json
import math
import os

import torch

from .config import RewardConfig
from .data import IGNORE_INDEX, collate_pairs, collate_sft
from .io_safety import atomic_path
from .loop import BaseTrainer, check_finite_model, default_pad_token
from .model import (
    RM_CONFIG_NAME, CausalLMLogprobs, Generator, RewardModel, apply_lora, enable_activation_checkpointing,
    fit_to_tokenizer, load_causal_lm, load_tokenizer, load_with_aliases, rebuild_reward_model, save_reward_model,
    save_tokenizer, shifted_targets,
)
from .objective import icrm_loss


class RewardTrainer(BaseTrainer):
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
        default_pad_token(tokenizer)  # before the model is fitted to the tokenizer (its config's pad id)
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


class SFTTrainer(BaseTrainer):
    """Fine-tune a causal LM on the chosen responses of preference data (the generator's SFT stage)."""

    collate = staticmethod(collate_sft)

    def __init__(self, model=None, args: RewardConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None):
        args = args or RewardConfig()
        tokenizer = processing_class or load_tokenizer(args.tokenizer_name_or_path, args.model_name_or_path)
        default_pad_token(tokenizer)
        if model is None or isinstance(model, str):
            model = load_causal_lm(model or args.model_name_or_path, tokenizer, seed=args.seed)
        if args.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.causal_lm = model  # what checkpoints and save_model hold, in its own (HF) names
        super().__init__(CausalLMLogprobs.from_causal_lm(model, backend=args.kernels), args,
                         train_dataset or args.train_file,
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
        return {k: v.detach().contiguous().cpu() for k, v in self.causal_lm.state_dict().items()}

    def _load_model_state(self, state):
        load_with_aliases(self.causal_lm, state)

    def _state_module(self):
        return self.causal_lm

    def save_model(self, output_dir: str | None = None) -> str:
        """Save as a Hugging Face causal-LM folder (+ tokenizer): the generator / RM init (under
        FSDP2 from the state gathered onto rank 0)."""
        output_dir = output_dir or os.path.join(self.args.output_dir, "final")
        check_finite_model(self.model)
        state = self._gathered_model_state() if self.sharded else None
        if self.is_main:
            with atomic_path(output_dir, directory=True) as tmp:
                self.causal_lm.save_pretrained(tmp, state_dict=state)
                save_tokenizer(self.tokenizer, tmp)
        self._barrier()
        return output_dir
