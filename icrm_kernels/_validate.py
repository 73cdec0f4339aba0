"""Shared argument checks. Every error names the argument, what was expected and what was given."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, floating: bool | None = None) -> torch.Tensor:
    """``t`` is a tensor; ``floating=True`` demands a float dtype, ``False`` an integer one."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating is True and not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")
    if floating is False and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must have an integer dtype (int64 or int32), got {t.dtype}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None], what: str = "") -> None:
    """``expected`` entries of None match any size."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {want}{extra}, got {tuple(t.shape)}")


def check_same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Float inputs of one op share one dtype: a float64/float16 mix would silently upcast."""
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; the float inputs "
                f"must share one dtype (cast explicitly, e.g. {name}.to({ref_name}.dtype))"
            )


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must share one device")


def check_positive(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number{' or None' if allow_none else ''}, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Targets lie in [0, V) or equal ignore_index (one device sync, cheaper than a bad gather)."""
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        first = targets[bad][:5].tolist()
        raise ValueError(
            f"targets must lie in [0, {vocab}) (V = weight.shape[0]) or equal ignore_index={ignore_index}; "
            f"{int(bad.sum())} entries do not, e.g. {first}"
        )


def check_cu_seqlens(cu_seqlens, total: int) -> torch.Tensor:
    """``cu_seqlens [S+1]``: integer, starts at 0, non-decreasing, ends at ``total``."""
    check_tensor("cu_seqlens", cu_seqlens, floating=False)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [S+1] with S >= 1, got {tuple(cu_seqlens.shape)}")
    cpu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cpu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {int(cpu[0])}")
    steps = cpu[1:] - cpu[:-1]
    if bool((steps < 0).any()):
        i = int(torch.nonzero(steps < 0)[0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {int(cpu[i])} > cu_seqlens[{i + 1}] = {int(cpu[i + 1])}"
        )
    if int(cpu[-1]) != total:
        raise ValueError(f"cu_seqlens must end at N = rewards.shape[0] = {total}, got cu_seqlens[-1] = {int(cpu[-1])}")
    return cu_seqlens.to(torch.int64)
