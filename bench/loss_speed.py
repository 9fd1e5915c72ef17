"""Forward + backward speed of ``csl`` against the reference algorithm and plain BCE (CPU).

    .venv/bin/python bench/loss_speed.py [--reps 60] [--threads 1]

Contenders, at B = 64, C = 9,600, K = 5, 50 classes with prior above eta = 0.5:

* ``csl``: ``trainer.losses.build_loss("csl", ...)``.
* ``reference``: the public reference code's algorithm, re-implemented here from its
  description: dense float targets 1 / 0 / -1 (0 = negative, -1 = un-annotated), the prior
  tensor rebuilt from a Python list on every call, Omega_L by argsort over the whole flattened
  batch (K * B labels), focusing weights under no_grad, sum reduction.
* ``bce``: ``F.binary_cross_entropy_with_logits`` (sum), the floor any loss pays.

The contenders alternate within every repetition and medians are reported, so a noisy
neighbour slows all of them alike. One intra-op thread by default: with two cores shared by
other jobs, a second thread turns every op into a wait for the slower core.
Bars: csl at least 15x faster than reference, at most 3x bce.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.losses import build_loss  # noqa: E402


def reference_loss(logits, targets_ref, prior_list, k, eta, gp=0.0, gn=1.0, gu=4.0):
    """The reference code's algorithm (reference encoding: 1 pos, 0 neg, -1 un-annotated)."""
    pos = (targets_ref == 1).float()
    neg = (targets_ref == 0).float()
    una = (targets_ref == -1).float()
    p = torch.sigmoid(logits)
    q = 1.0 - p
    prior = torch.tensor(prior_list)                                   # rebuilt every call
    weights = torch.ones_like(targets_ref)
    weights[:, torch.where(prior > eta)[0]] = 0
    weights = (weights + (targets_ref != -1).float()).bool().float()
    with torch.no_grad():
        flat_t, flat_w, flat_q = targets_ref.flatten(), weights.view(-1), q.flatten()
        cand = torch.where(flat_t == -1)[0]
        order = torch.argsort(flat_q[cand])                            # most likely first
        flat_w[cand[order[: k * logits.shape[0]]]] = 0
    loss = (pos * torch.log(p.clamp(min=1e-8)) + neg * torch.log(q.clamp(min=1e-8))
            + una * torch.log(q.clamp(min=1e-8)))
    with torch.no_grad():
        w = torch.pow(1 - p * pos - q * (neg + una), gp * pos + gn * neg + gu * una)
    return -(loss * w * weights).sum()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=9600)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b, c, k, eta = args.batch, args.classes, 5, 0.5

    g = torch.Generator().manual_seed(0)
    logits0 = torch.randn(b, c, generator=g) * 2 - 4
    targets = torch.zeros(b, c, dtype=torch.int8)                      # ~7 annotated per image
    for i in range(b):
        idx = torch.randperm(c, generator=g)[:7]
        targets[i, idx[:3]], targets[i, idx[3:]] = 1, -1
    prior = torch.rand(c, generator=g) * 0.3
    prior[torch.randperm(c, generator=g)[:50]] = 0.6 + 0.4 * torch.rand(50, generator=g)
    prior_list = prior.tolist()
    targets_ref = torch.where(targets == 1, 1.0, torch.where(targets == -1, 0.0, -1.0))
    bce_target = (targets == 1).float()

    csl = build_loss("csl", prior=prior, likelihood_topk=k, prior_threshold=eta,
                     gamma_pos=0.0, gamma_neg=1.0, gamma_unann=4.0)
    contenders = {
        "csl": lambda x: csl(x, targets),
        "reference": lambda x: reference_loss(x, targets_ref, prior_list, k, eta),
        "bce": lambda x: F.binary_cross_entropy_with_logits(x, bce_target, reduction="sum"),
    }

    # Same loss up to the selection scope (reference ranks K * B over the batch).
    x = logits0.clone().requires_grad_()
    batch_csl = build_loss("csl", prior=prior, likelihood_topk=k, prior_threshold=eta,
                           topk_scope="batch")
    ours, ref = batch_csl(x, targets), reference_loss(x, targets_ref, prior_list, k, eta)
    print(f"check: csl(topk_scope='batch') = {ours.item():.4f}, reference = {ref.item():.4f}")

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(args.reps + 3):
        for name, fn in contenders.items():
            x = logits0.clone().requires_grad_()
            start = time.perf_counter()
            fn(x).backward()
            elapsed = time.perf_counter() - start
            if rep >= 3:                                               # warm-up
                times[name].append(elapsed)

    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    print(f"\nforward+backward, B={b}, C={c}, K={k}, threads={args.threads}, reps={args.reps} (median ms)")
    print(f"{'loss':<12}{'median ms':>12}{'p10 ms':>10}{'p90 ms':>10}")
    for name, v in times.items():
        q = statistics.quantiles([t * 1e3 for t in v], n=10)
        print(f"{name:<12}{med[name]:>12.3f}{q[0]:>10.3f}{q[-1]:>10.3f}")
    speedup = med["reference"] / med["csl"]
    overhead = med["csl"] / med["bce"]
    bar1, bar2 = speedup >= 15.0, overhead <= 3.0
    print(f"\nreference / csl = {speedup:.1f}x  (bar >= 15x)  {'PASS' if bar1 else 'FAIL'}")
    print(f"csl / bce       = {overhead:.2f}x  (bar <= 3x)   {'PASS' if bar2 else 'FAIL'}")
    return 0 if bar1 and bar2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
