"""Effect of the backward's gradient filter (``grad_filter_eps``) on d_hidden / d_weight, against
the float64 gold, next to the error of the eager reference in the same dtype.

The filter drops every (row block x vocab tile) of ``dx`` whose ``|1[j = target] - p_j|`` stays
below eps for all rows of the block (kernels.py header). This script applies exactly that rule
in float64 with the sm_90 dlogits tile (from plan.py), so the numbers isolate the filter from the
kernels' rounding (which the three-way tests cover). Two logit distributions:

* peaked (trained-LM-like): token ids in frequency order with a Zipf prior, a few plausible next
  tokens per row well above the rest, targets sampled from the model's own softmax;
* flat: small random logits, uniform targets (the filter's worst case: nothing is skipped).

    python -m benchmarks.filter_accuracy        # about a minute on 2 CPU cores; prints only
"""

from __future__ import annotations

import argparse
import math

import torch

from icrm_kernels.linear_logprobs import plan


def grads(hidden, weight, bias, targets, plausible, g, keep=None):
    """d_hidden, d_weight of ``sum g * logp`` in float64, with ``dx`` masked by ``keep``
    (``plausible``: per-row token ids whose logit is raised by 12, part of the model here)."""
    z = hidden @ weight.T + bias
    if plausible is not None:
        z.scatter_add_(1, plausible, torch.full(plausible.shape, 12.0, dtype=z.dtype))
    p = torch.softmax(z, dim=1)
    dz = torch.nn.functional.one_hot(targets, weight.shape[0]).double() - p
    dx = g[:, None] * dz
    if keep is not None:
        dx = dx * keep
    return dx @ weight, dx.T @ hidden, dz


def tile_keep(dz, eps, bm, bn):
    n, v = dz.shape
    pad = torch.zeros(-(-n // bm) * bm, -(-v // bn) * bn, dtype=dz.dtype)
    pad[:n, :v] = dz.abs()
    live = pad.reshape(pad.shape[0] // bm, bm, pad.shape[1] // bn, bn).amax(dim=(1, 3)) >= eps
    keep = live.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:n, :v]
    return keep.double(), live.double().mean().item()


def problem(kind, n=512, d=256, v=32000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    if kind == "peaked":
        # Token ids roughly in frequency order (as BPE vocabularies are), a Zipf prior, weak
        # hidden-state logits, and a few plausible next tokens per row (drawn from the prior)
        # 12 nats above the rest: most of the mass on a handful of tokens, as in a trained LM.
        prior = -1.1 * torch.log(torch.arange(1, v + 1, dtype=torch.float64))
        plausible = torch.multinomial(torch.softmax(prior, 0).expand(n, v), 4, generator=gen)
        bias = prior
        z = hidden @ weight.T + bias
        z.scatter_add_(1, plausible, torch.full(plausible.shape, 12.0, dtype=torch.float64))
        targets = torch.multinomial(torch.softmax(z, dim=1), 1, generator=gen).squeeze(1)
        return hidden, weight, bias, targets, plausible, g_of(n, gen)
    else:
        bias = torch.zeros(v, dtype=torch.float64)
        weight = weight * 0.5
        targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, bias, targets, None, g_of(n, gen)


def g_of(n, gen):
    return torch.randn(n, generator=gen, dtype=torch.float64) / n  # a mean loss's upstream scale


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    cfg = plan.configs("bf16", "sm_90").dlogits
    print(f"tile {cfg.block_m} x {cfg.block_n}; error = max|x - gold| / max|gold|")
    print("dist    dtype eps        live_tiles  d_hidden_err  d_weight_err  eager_d_hidden  eager_d_weight")
    for kind in ("peaked", "flat"):
        hidden, weight, bias, targets, plausible, g = problem(kind)
        gold_h, gold_w, dz = grads(hidden, weight, bias, targets, plausible, g)
        for dtype in (torch.bfloat16, torch.float16):
            eps = torch.finfo(dtype).eps / 32
            keep, live = tile_keep(dz, eps, cfg.block_m, cfg.block_n)
            fh, fw, _ = grads(hidden, weight, bias, targets, plausible, g, keep)
            cast = [t.to(dtype).double() for t in (hidden, weight, bias)]
            eh, ew, _ = grads(*cast, targets, plausible, g)
            eh, ew = eh.to(dtype).double(), ew.to(dtype).double()

            def err(x, gold):
                return ((x - gold).abs().max() / gold.abs().max()).item()

            print(f"{kind:7s} {str(dtype)[6:]:5s} {eps:.3e}  {live:10.4f}  {err(fh, gold_h):12.2e}  "
                  f"{err(fw, gold_w):12.2e}  {err(eh, gold_h):14.2e}  {err(ew, gold_w):14.2e}")


if __name__ == "__main__":
    main()
