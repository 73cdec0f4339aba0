"""The reward model, the frozen generator, the built-in tiny model/tokenizer, and HF export.

``RewardModel`` = a causal LM's decoder (``backbone``), a value head ``score: Linear(D, 1)``
applied at every position, and a trainable copy ``lm_head`` of the LM head for the GRM SFT
term. Its forward never builds ``[B, T, V]`` logits: the decoder's last hidden states go
straight into ``icrm_kernels.linear_logprobs_and_rewards``.

Pooling: the reward of a sequence is ``r`` at its last label token. With right padding, a
pad token distinct from EOS and labels running to the end of the row, that is exactly the
rightmost non-pad token, which is what ``<Arch>ForSequenceClassification`` scores; the
export test checks the two agree.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import torch
from torch import nn
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast,
)

from icrm_kernels import linear_logprobs, linear_logprobs_and_rewards

from .config import BUILTIN_MODEL
from .io_safety import IcrmError, check_model_source, first_line

RM_CONFIG_NAME = "icrm_reward_model.json"
RM_WEIGHTS_NAME = "model.safetensors"

# ------------------------------------------------------------------------------------------
# Built-in tokenizer and model (offline, deterministic)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
#: Words of the shipped tasks plus a few generic ones; anything else maps to <unk>.
WORDS = ["sort", "sorted", ":", "->", ",", ".", "?", "answer", "step", "the", "a", "is", "list"] + [str(i) for i in range(100)]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} "
    "{% if message['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, whitespace-split tokenizer with a chat template; pad (id 0) != eos (id 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:], padding_side="right", truncation_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(tokenizer, hidden_size: int = 64, num_layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False, rms_norm_eps=1e-5,
    )


def load_tokenizer(tokenizer_name_or_path: str | None, model_name_or_path: str):
    """The tokenizer, with a pad token distinct from EOS (added when missing)."""
    path = tokenizer_name_or_path
    if path is None:
        random_init = model_name_or_path == BUILTIN_MODEL or model_name_or_path.endswith(".json")
        folder_without_tokenizer = os.path.isdir(model_name_or_path) and not any(
            os.path.exists(os.path.join(model_name_or_path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
        )
        if random_init or folder_without_tokenizer:
            return build_tiny_tokenizer()
        path = model_name_or_path
    field = "tokenizer_name_or_path" if tokenizer_name_or_path else "model_name_or_path"
    check_model_source(path, field)
    try:
        tokenizer = load_tokenizer_folder(path)
    except OSError as exc:
        raise IcrmError(f"{field} {path}: no tokenizer there, locally or on the hub ({first_line(exc)})") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no eos_token; the trainer appends EOS to every response")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # HF sequence classification scores the rightmost non-pad token: pad == eos would skip EOS.
        tokenizer.add_special_tokens({"pad_token": "<|icrm_pad|>"})
    tokenizer.padding_side = "right"
    return tokenizer


#: Tokenizer classes that are "the tokenizer.json as it is". transformers 5 saves these as
#: ``TokenizersBackend``, a name 4.x does not know; and its ``AutoTokenizer`` swaps in the model
#: type's own class for some types (a ``qwen2`` folder gets ``Qwen2Tokenizer``, which replaces the
#: pre-tokenizer and so changes the ids of a tokenizer that is not Qwen's).
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer_folder(path: str):
    """``AutoTokenizer.from_pretrained(path)``, except that a folder whose ``tokenizer_config.json``
    names a generic class loads as exactly that (same class and ids as when it was saved)."""
    config_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as fh:
            if json.load(fh).get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES:
                return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def save_tokenizer(tokenizer, directory: str) -> None:
    """``tokenizer.save_pretrained`` that records a generic class under the name both transformers
    4.x and 5.x load (``PreTrainedTokenizerFast``)."""
    tokenizer.save_pretrained(directory)
    if type(tokenizer).__name__ in GENERIC_TOKENIZER_CLASSES:
        _edit_json(os.path.join(directory, "tokenizer_config.json"), tokenizer_class="PreTrainedTokenizerFast")


def _edit_json(path: str, **changes) -> None:
    """Set (or, with value None, remove) top-level keys of a JSON file."""
    with open(path) as fh:
        data = json.load(fh)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)


def is_sequence_classification(name_or_path) -> bool:
    """Is this a folder holding an ``<Arch>ForSequenceClassification`` (an icrm export, TRL's output)?"""
    config_path = os.path.join(name_or_path, "config.json") if isinstance(name_or_path, str) else ""
    if not os.path.isfile(config_path):
        return False
    with open(config_path) as fh:
        architectures = json.load(fh).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def load_causal_lm(name_or_path: str, tokenizer, *, seed: int = 0) -> nn.Module:
    """The starting model in fp32: built-in tiny (random init), a config.json (random init), a
    causal-LM folder, or a sequence-classification folder (loaded as such: its ``score`` head
    becomes the value head's init, and it has no LM head)."""
    if name_or_path != BUILTIN_MODEL:
        check_model_source(name_or_path, "model path")  # also the generator's: callers name the field
    if name_or_path == BUILTIN_MODEL or name_or_path.endswith(".json"):
        config = tiny_config(tokenizer) if name_or_path == BUILTIN_MODEL else AutoConfig.from_pretrained(name_or_path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
    else:  # a local folder, or a hub id where the machine can download
        classifier = is_sequence_classification(name_or_path)
        try:
            model = (AutoModelForSequenceClassification if classifier else AutoModelForCausalLM).from_pretrained(
                name_or_path, dtype=torch.float32)
        except OSError as exc:
            raise IcrmError(f"model {name_or_path}: no model there, locally or on the hub ({first_line(exc)})") from None
        if classifier and model.config.pad_token_id == tokenizer.eos_token_id:
            warnings.warn(f"{name_or_path}: the classifier's pad token is its EOS (TRL's default when a tokenizer has no "
                          "pad), so HF and TRL read its reward at the token before EOS; icrm reads it at EOS (after "
                          "adding a pad token), so its scores differ from TRL's for this model")
    fit_to_tokenizer(model, tokenizer)
    return model


def fit_to_tokenizer(model: nn.Module, tokenizer) -> None:
    """Grow the embeddings to the tokenizer (an added pad token) and record its pad id."""
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` less the tensors that alias an earlier entry (tied embeddings: ``lm_head.weight``
    is ``embed_tokens.weight``). safetensors refuses to save shared tensors;
    :func:`load_with_aliases` restores the dropped names from the kept one."""
    seen, kept = set(), {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        kept[name] = tensor
    return kept


def load_with_aliases(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state)`` where a missing name is allowed only if it is tied to a
    loaded one (what :func:`without_aliases` dropped); anything else missing or unexpected raises."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    tensors = dict(module.named_parameters(remove_duplicate=False))
    loaded = {id(tensors[n]) for n in state if n in tensors}
    untied = [n for n in missing if n not in tensors or id(tensors[n]) not in loaded]
    if untied or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {untied[:5]}, unexpected {unexpected[:5]}")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of an HF model (transformers 5 name, or the 4.x one)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _softcap(config) -> float | None:
    return getattr(config, "final_logit_softcapping", None) or None


def decoder_of(causal_lm: nn.Module) -> nn.Module:
    """The causal LM's decoder (``LlamaModel`` inside ``LlamaForCausalLM``): hidden states, no logits."""
    return getattr(causal_lm, causal_lm.base_model_prefix)


#: Most tokens of a packed row that one decoder call sees. transformers turns a packed row into a
#: dense block-diagonal ``[n, n]`` mask and PyTorch's CPU SDPA with a mask keeps ``O(n^2)`` memory,
#: so :func:`last_hidden` cuts a long packed row into runs of whole sequences of at most this many
#: tokens (a longer sequence runs alone: one causal sequence needs no mask, and SDPA takes its
#: memory-efficient kernel). Attention memory is then ``O(N * PACKED_RUN_TOKENS)``, not ``O(N^2)``,
#: while a batch of short sequences still takes one call (the default job's speed).
PACKED_RUN_TOKENS = 1024


def packed_runs(cu_seqlens: torch.Tensor, limit: int = PACKED_RUN_TOKENS) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: consecutive sequences of ``cu_seqlens [R + 1]`` grouped greedily into
    runs of at most ``limit`` tokens (a sequence longer than ``limit`` is a run of its own)."""
    bounds = cu_seqlens.tolist()
    runs, start = [], bounds[0]
    for end, next_end in zip(bounds[1:], bounds[2:]):
        if next_end - start > limit:
            runs.append((start, end))
            start = end
    runs.append((start, bounds[-1]))
    return runs


def last_hidden(decoder: nn.Module, input_ids, attention_mask, position_ids=None, cu_seqlens=None) -> torch.Tensor:
    """``[R, T, D]`` last hidden states, in the autocast dtype when autocast is on.

    Packed batches pass ``[1, N]`` inputs, ``attention_mask=None``, ``position_ids`` that restart
    per sequence and ``cu_seqlens [R + 1]``; the decoder then runs over :func:`packed_runs` of the
    row and the states are concatenated back into ``[1, N, D]`` (the same values: no sequence
    attends outside itself either way). Without ``cu_seqlens`` a packed row is one call.
    HF decoders keep the residual stream (and so the final norm's output) in the weights'
    dtype under autocast; casting here lets the fused ops read bf16/fp16 as the kernels expect.
    """
    if cu_seqlens is not None:
        runs = packed_runs(cu_seqlens, PACKED_RUN_TOKENS)
        if len(runs) > 1:
            return torch.cat([last_hidden(decoder, input_ids[:, a:b], None, position_ids[:, a:b]) for a, b in runs], dim=1)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if hidden.is_cuda and torch.is_autocast_enabled("cuda"):
        hidden = hidden.to(torch.get_autocast_dtype("cuda"))
    return hidden


def shifted_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """``[R, T]`` targets of position t = labels[t + 1]; the last position of a row (or, packed
    ``[1, N]`` with ``cu_seqlens``, of every sequence) predicts nothing."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    targets = torch.cat([labels[:, 1:], pad], dim=1)
    if cu_seqlens is not None:
        targets[0, cu_seqlens[1:] - 1] = ignore_index
    return targets


@torch.no_grad()
def check_packing_support(decoder: nn.Module) -> None:
    """Raise ``ValueError`` unless the decoder keeps packed sequences apart (``padding_free``)."""
    device = decoder.get_input_embeddings().weight.device
    vocab = decoder.get_input_embeddings().num_embeddings
    seqs = [torch.arange(3, device=device) % vocab, (torch.arange(4, device=device) + 5) % vocab]
    was_training = decoder.training
    decoder.eval()
    separate = torch.cat([last_hidden(decoder, s[None], None)[0] for s in seqs])
    position_ids = torch.cat([torch.arange(len(s), device=device) for s in seqs])[None]
    packed = last_hidden(decoder, torch.cat(seqs)[None], None, position_ids)[0]
    decoder.train(was_training)
    if not torch.allclose(separate.float(), packed.float(), atol=1e-3, rtol=1e-3):
        raise ValueError(
            f"padding_free: {type(decoder).__name__} attends across packed sequences (its mask ignores "
            "position_ids); use padding_free: false for this model"
        )


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied if it is a view (``squeeze``, the fused ops' ``reshape`` to ``[R, T]``).
    Under FSDP2 the reward model (or the SFT stage's :class:`CausalLMLogprobs`) is the root unit:
    FSDP hooks its backward onto the forward's outputs and warns ("returned a view tensor ...
    wrong gradients") at every view among them, since an in-place op on a view would drop that
    hook. The copies are ``[R, T]``, small."""
    return tensor.clone() if tensor._base is not None else tensor


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class RewardModel(nn.Module):
    """Backbone + per-token value head ``score`` + trainable LM-head copy ``lm_head`` (or None)."""

    def __init__(self, causal_lm: nn.Module, *, value_head_bias: bool = False, with_lm_head: bool = True,
                 sft_grad_scale: float = 1e-3, backend: str = "auto"):
        super().__init__()
        self.config = causal_lm.config
        self.backbone = decoder_of(causal_lm)
        hidden_size = self.backbone.get_input_embeddings().embedding_dim
        self.score = nn.Linear(hidden_size, 1, bias=value_head_bias)
        nn.init.normal_(self.score.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        if value_head_bias:
            nn.init.zeros_(self.score.bias)
        trained_head = getattr(causal_lm, "score", None)  # a sequence-classification model's own head
        if isinstance(trained_head, nn.Linear) and trained_head.out_features == 1:
            with torch.no_grad():
                self.score.weight.copy_(trained_head.weight)
                if value_head_bias and trained_head.bias is not None:
                    self.score.bias.copy_(trained_head.bias)
        self.lm_head = None
        source = causal_lm.get_output_embeddings()
        if with_lm_head and source is None:
            raise ValueError(f"{type(causal_lm).__name__} has no LM head for the SFT term (a sequence-classification "
                             "model); set sft_regularizer: false")
        if with_lm_head:
            self.lm_head = nn.Linear(hidden_size, source.out_features, bias=source.bias is not None)
            # A real copy, untied from the input embeddings: the head trains on its own.
            self.lm_head.load_state_dict({k: v.detach().clone() for k, v in source.state_dict().items()})
        self.sft_grad_scale = sft_grad_scale
        self.backend = backend
        self.softcap = _softcap(self.config)
        self.value_head_bias = value_head_bias

    @property
    def device(self) -> torch.device:
        return self.score.weight.device

    def forward(self, input_ids, attention_mask, sft_targets=None, position_ids=None, cu_seqlens=None):
        """``input_ids, attention_mask [R, T]`` -> ``(rewards [R, T] fp32, sft_logprobs [R, T] or None)``.

        ``sft_targets [R, T]``: the token position t should predict (``shifted_targets(labels)``
        with -100 where no SFT term is wanted). None (or no ``lm_head``): rewards only.
        Packed batches: ``[1, N]`` inputs, ``attention_mask=None``, restarting ``position_ids`` and
        ``cu_seqlens`` (see :func:`last_hidden`).
        """
        hidden = last_hidden(self.backbone, input_ids, attention_mask, position_ids, cu_seqlens)
        if sft_targets is None or self.lm_head is None:
            rewards = self.score(hidden).squeeze(-1)
            return _owned(rewards.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)), None
        s = self.sft_grad_scale
        # The fused op reads `hidden` once for both outputs, but only the SFT term's gradient
        # to the backbone is to be scaled by s. Feed it a gradient-scaled view of `hidden`, then
        # give the rewards back the missing (1 - s) of their gradient with a term that is 0 in
        # value and adds nothing to the value head's own gradient (hidden - sg(hidden) = 0).
        head_bias = None if self.score.bias is None else self.score.bias.to(hidden.dtype)
        logp, rewards = linear_logprobs_and_rewards(
            _ScaleGrad.apply(hidden, s), self.lm_head.weight.to(hidden.dtype), sft_targets,
            self.score.weight.to(hidden.dtype),
            bias=None if self.lm_head.bias is None else self.lm_head.bias.to(hidden.dtype),
            value_bias=head_bias, softcap=self.softcap, backend=self.backend,
        )
        if s != 1.0:
            value_weight = self.score.weight.reshape(-1).to(hidden.dtype)
            rewards = rewards + (1.0 - s) * (hidden @ value_weight - hidden.detach() @ value_weight).to(rewards.dtype)
        return _owned(rewards), _owned(logp)

    # ---------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: everything, or with LoRA only the trainable tensors."""
        state = self.state_dict()
        if getattr(self, "is_peft", False):
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in trainable}
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"checkpoint has tensors this model lacks: {unexpected[:5]}")
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        missing_trainable = sorted(set(missing) & trainable)
        if missing_trainable:
            raise ValueError(f"checkpoint lacks trainable tensors: {missing_trainable[:5]}")

    def merged_backbone(self) -> nn.Module:
        """The backbone with any LoRA adapters merged in (a copy; self is unchanged)."""
        backbone = copy.deepcopy(self.backbone)
        if getattr(self, "is_peft", False):
            backbone = backbone.merge_and_unload()
        return backbone


def apply_lora(rm: RewardModel, r: int, alpha: int, dropout: float, target_modules) -> RewardModel:
    """Wrap the backbone with peft LoRA; the value head and the head copy stay trainable."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none")
    if target_modules is None:
        cfg.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
    rm.backbone = get_peft_model(rm.backbone, cfg)
    rm.is_peft = True
    return rm


class CausalLMLogprobs(nn.Module):
    """``log p(targets)`` of a decoder + LM head without ``[R, T, V]`` logits: the fused
    :func:`icrm_kernels.linear_logprobs` on the last hidden states, with the model's own final-logit
    softcap (Gemma-2's ``final_logit_softcapping``) and then ``temperature``, as the model's own
    logits would give them. The one log-prob path of the generator SFT and the frozen generator.
    """

    def __init__(self, backbone: nn.Module, lm_head: nn.Module, *, softcap: float | None = None,
                 temperature: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.backbone, self.lm_head = backbone, lm_head
        self.config = backbone.config  # the causal LM's own (HF decoders share it with their *ForCausalLM)
        self.softcap, self.temperature, self.backend = softcap, temperature, backend

    @classmethod
    def from_causal_lm(cls, causal_lm: nn.Module, *, temperature: float = 1.0, backend: str = "auto"):
        """Read ``causal_lm``'s decoder and LM head in place (training this module trains it)."""
        if causal_lm.get_output_embeddings() is None:
            raise ValueError(f"{type(causal_lm).__name__} has no LM head (a sequence-classification model); "
                             "log-probs need a causal LM")
        return cls(decoder_of(causal_lm), causal_lm.get_output_embeddings(), softcap=_softcap(causal_lm.config),
                   temperature=temperature, backend=backend)

    def forward(self, input_ids, attention_mask, targets, position_ids=None, cu_seqlens=None) -> torch.Tensor:
        """``targets [R, T]`` (``shifted_targets(labels)``: the token position t predicts) -> log-probs
        ``[R, T]`` fp32, 0 where the target is -100. Packed batches as in :func:`last_hidden`."""
        hidden = last_hidden(self.backbone, input_ids, attention_mask, position_ids, cu_seqlens)
        weight = self.lm_head.weight.to(hidden.dtype)
        bias = None if self.lm_head.bias is None else self.lm_head.bias.to(hidden.dtype)
        return _owned(linear_logprobs(hidden, weight, targets, bias=bias, temperature=self.temperature,
                                      softcap=self.softcap, backend=self.backend))


class Generator(CausalLMLogprobs):
    """The frozen generator: ``g_t = log p(labels[t+1] | prefix)`` without ``[B, T, V]`` logits."""

    def __init__(self, causal_lm: nn.Module, *, temperature: float = 1.0, backend: str = "auto"):
        if causal_lm.get_output_embeddings() is None:
            raise ValueError(f"the generator needs a causal LM; {type(causal_lm).__name__} has no LM head (a "
                             "sequence-classification model): set generator_name_or_path to a causal-LM folder, "
                             "or reg_ratio: 0")
        super().__init__(decoder_of(causal_lm), causal_lm.get_output_embeddings(), softcap=_softcap(causal_lm.config),
                         temperature=temperature, backend=backend)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_reward_model(cls, rm: RewardModel, *, temperature: float = 1.0, backend: str = "auto") -> "Generator":
        """A frozen copy of the reward model's current backbone and LM-head copy (its starting policy)."""
        if rm.lm_head is None:
            raise ValueError("the reward model has no LM-head copy (sft_regularizer=false); pass generator= "
                             "or set generator_name_or_path")
        gen = cls.__new__(cls)
        CausalLMLogprobs.__init__(gen, rm.merged_backbone(), copy.deepcopy(rm.lm_head), softcap=rm.softcap,
                                  temperature=temperature, backend=backend)
        gen.requires_grad_(False)
        gen.eval()
        return gen

    def train(self, mode: bool = True):  # always eval: no dropout in the frozen policy
        return super().train(False)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, labels, position_ids=None, cu_seqlens=None) -> torch.Tensor:
        """``[R, T]`` inputs -> ``gen_logprobs [R, T-1]`` (0 where ``labels[t+1] == -100``).

        Packed (``cu_seqlens`` given, ``[1, N]`` inputs): ``[N]``, 0 at sequence ends.
        """
        logp = super().forward(input_ids, attention_mask, shifted_targets(labels, cu_seqlens), position_ids, cu_seqlens)
        return logp[0] if cu_seqlens is not None else logp[:, :-1]


# ------------------------------------------------------------------------------------------
# Saving and loading

def save_reward_model(rm: RewardModel, tokenizer, directory: str, *, full: bool = True, extra: dict | None = None) -> None:
    """Write ``config.json``, the tokenizer, ``icrm_reward_model.json`` and the weights.

    ``full=True`` stores the merged backbone (loadable alone); ``False`` stores what
    :meth:`RewardModel.trainable_state_dict` gives (adapters only with LoRA).
    """
    os.makedirs(directory, exist_ok=True)
    if full:
        state = {f"backbone.{k}": v for k, v in rm.merged_backbone().state_dict().items()}
        state.update({f"score.{k}": v for k, v in rm.score.state_dict().items()})
        if rm.lm_head is not None:
            state.update({f"lm_head.{k}": v for k, v in rm.lm_head.state_dict().items()})
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    else:
        state = rm.trainable_state_dict()
    save_file(state, os.path.join(directory, RM_WEIGHTS_NAME))
    rm.config.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    meta = {"value_head_bias": rm.value_head_bias, "with_lm_head": rm.lm_head is not None, "full": full}
    meta.update(extra or {})
    with open(os.path.join(directory, RM_CONFIG_NAME), "w") as fh:
        json.dump(meta, fh, indent=2)


def load_reward_model(directory: str, *, backend: str = "auto") -> tuple[RewardModel, object]:
    """Load a folder written by :func:`save_reward_model` with ``full=True``, or any
    ``<Arch>ForSequenceClassification`` folder (``icrm export``'s, TRL's) (``icrm eval/score``)."""
    meta_path = os.path.join(directory, RM_CONFIG_NAME)
    if not os.path.exists(meta_path) and is_sequence_classification(directory):
        tokenizer = load_tokenizer(None, directory)
        return RewardModel(load_causal_lm(directory, tokenizer), with_lm_head=False, backend=backend), tokenizer
    if not os.path.exists(meta_path):
        raise ValueError(f"{directory} is neither an icrm reward-model folder (no {RM_CONFIG_NAME}) nor a "
                         "sequence-classification folder; pass a run's final/ or checkpoint-N/, or an export")
    with open(meta_path) as fh:
        meta = json.load(fh)
    if not meta.get("full", True):
        raise ValueError(f"{directory} holds LoRA adapters only; load it through RewardTrainer(resume_from_checkpoint=...)")
    tokenizer = load_tokenizer_folder(directory)
    rm = rebuild_reward_model(AutoConfig.from_pretrained(directory), load_file(os.path.join(directory, RM_WEIGHTS_NAME)),
                              value_head_bias=meta["value_head_bias"], with_lm_head=meta["with_lm_head"], backend=backend)
    return rm, tokenizer


def rebuild_reward_model(config, state: dict[str, torch.Tensor], *, value_head_bias: bool, with_lm_head: bool,
                         sft_grad_scale: float = 1e-3, backend: str = "auto") -> RewardModel:
    """A plain (unsharded, LoRA-free) ``RewardModel`` of this config holding the full ``state``."""
    causal_lm = AutoModelForCausalLM.from_config(config)
    rm = RewardModel(causal_lm, value_head_bias=value_head_bias, with_lm_head=with_lm_head,
                     sft_grad_scale=sft_grad_scale, backend=backend)
    rm.load_state_dict(state)
    return rm


def export_sequence_classification(rm: RewardModel, tokenizer, directory: str) -> str:
    """Save as an HF ``<Arch>ForSequenceClassification`` folder loadable by RewardBench / TRL.

    ``num_labels=1``, the pad token set, ``score.weight [1, D]``, LoRA merged, no ``lm_head``,
    safetensors. A value-head bias has no slot there; it only shifts every reward by a constant
    (pairwise preferences unchanged), so it is dropped with a warning.
    """
    backbone = rm.merged_backbone()
    config = copy.deepcopy(rm.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    arch = type(backbone).__name__.removesuffix("Model")
    config.architectures = [f"{arch}ForSequenceClassification"]
    config.id2label, config.label2id = {0: "LABEL_0"}, {"LABEL_0": 0}
    model = AutoModelForSequenceClassification.from_config(config)
    getattr(model, model.base_model_prefix).load_state_dict(backbone.state_dict())
    with torch.no_grad():
        model.score.weight.copy_(rm.score.weight.detach().reshape(1, -1))
    if rm.score.bias is not None and float(rm.score.bias.detach().abs().max()) > 0:
        warnings.warn("the value head's bias is dropped in the export (a constant shift of every reward)")
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(tokenizer_appending_eos(tokenizer), directory)
    # tokenizer.json's post-processor is now the one source of special tokens: these flags would
    # make transformers rebuild it without the EOS.
    _edit_json(os.path.join(directory, "tokenizer_config.json"), add_bos_token=None, add_eos_token=None)
    return directory


def tokenizer_appending_eos(tokenizer) -> PreTrainedTokenizerFast:
    """A generic fast copy of ``tokenizer`` whose ``tokenizer(text)`` ends with EOS.

    The reward is read at the EOS the trainer appends to every response; with this
    post-processor, plain ``tokenizer(prompt + response)`` on the export gives the same ids as
    training (and ``icrm score``) do, and the rightmost non-pad token HF scores is that EOS.
    Special tokens the tokenizer already adds (a BOS) are kept in front.
    """
    from tokenizers.processors import TemplateProcessing

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"export needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if start is None:
        raise ValueError(f"cannot tell which special tokens {type(tokenizer).__name__} adds around the text")
    prefix = tokenizer.convert_ids_to_tokens(full[:start])
    suffix = tokenizer.convert_ids_to_tokens(full[start + len(plain):])
    if suffix[-1:] != [tokenizer.eos_token]:
        suffix.append(tokenizer.eos_token)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in prefix + suffix}
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.post_processor = TemplateProcessing(
        single=" ".join(prefix + ["$A"] + suffix), pair=" ".join(prefix + ["$A", "$B:1"] + suffix),
        special_tokens=list(special.items()),
    )
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    exported = PreTrainedTokenizerFast(
        tokenizer_object=backend, **{n: getattr(tokenizer, n) for n in names if getattr(tokenizer, n) is not None},
        padding_side="right", truncation_side=tokenizer.truncation_side, model_max_length=tokenizer.model_max_length,
    )
    exported.chat_template = tokenizer.chat_template
    return exported
