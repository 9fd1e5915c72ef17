"""Every loss against a loop-over-(b, c) transcription of its equation, values and gradients.

The references below are written from the papers' formulas, one scalar term at a time, with no
vectorisation tricks, so they check the maths of the fast implementations rather than repeat it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import LOSSES, build_loss, loss_params

B, C = 5, 8


def make_batch(seed: int = 0, b: int = B, c: int = C):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, c, generator=g) * 2.5).requires_grad_()
    targets = torch.randint(-1, 2, (b, c), generator=g).to(torch.int8)
    targets[0] = 0                                           # nothing annotated
    targets[1] = torch.where(targets[1] == 0, torch.ones_like(targets[1]), targets[1])  # all annotated
    targets[2, :] = 0
    targets[2, 1], targets[2, 2] = 1, -1                     # mostly un-annotated, few labels
    prior = torch.rand(c, generator=g)
    return logits, targets, prior


# ----------------------------------------------------------------------------- references

def _eq3_term(z, y, omega, gp, gn, gu, clip, detach):
    """One term of paper 1 eq. (3), as a loss (negated)."""
    p = torch.sigmoid(z)
    if y == 1:
        w = (1 - p) ** gp
        return -(w.detach() if detach else w) * F.logsigmoid(z)
    pm = torch.clamp(p - clip, min=0.0) if clip > 0 else p
    g = gn if y == -1 else gu
    w = pm ** g
    log_q = torch.log(1 - pm) if clip > 0 else F.logsigmoid(-z)
    om = 1.0 if y == -1 else omega
    return -om * (w.detach() if detach else w) * log_q


def _omega_l(x, t, k, scope):
    """Omega_L of eq. (5) by sorting Python lists."""
    out = set()
    if scope == "sample":
        for b in range(x.shape[0]):
            un = [c for c in range(x.shape[1]) if t[b, c] == 0]
            un.sort(key=lambda c: -float(x[b, c]))
            out |= {(b, c) for c in un[:k]}
    else:
        un = [(b, c) for b in range(x.shape[0]) for c in range(x.shape[1]) if t[b, c] == 0]
        un.sort(key=lambda bc: -float(x[bc]))
        out |= set(un[: k * x.shape[0]])
    return out


def ref_loss(name, x, t, prior=None, epoch=0, total=None, pseudo=None, reduction="sum", **kw):
    x = x.double()
    bsz, ncls = x.shape
    tl = t.tolist()
    total_loss = x.new_zeros(())
    detach = kw.get("detach_focus", True)
    if name in ("ignore", "negative", "focal", "asl", "pasl", "csl", "csl-soft"):
        gp, gn, gu, clip = 0.0, 0.0, 0.0, 0.0
        if name == "focal":
            gp = gn = gu = kw.get("gamma", 2.0)
        elif name == "asl":
            gp, gn, clip = kw.get("gamma_pos", 0.0), kw.get("gamma_neg", 4.0), kw.get("clip", 0.05)
            gu = gn
        elif name in ("pasl", "csl", "csl-soft"):
            gp, gn, gu = kw.get("gamma_pos", 0.0), kw.get("gamma_neg", 1.0), kw.get("gamma_unann", 4.0)
            clip = kw.get("clip", 0.0)
        omega_l = set()
        if name in ("csl", "csl-soft"):
            omega_l = _omega_l(x.detach(), tl_tensor(tl), kw.get("likelihood_topk", 5), kw.get("topk_scope", "sample"))
        for b in range(bsz):
            for c in range(ncls):
                y = tl[b][c]
                omega = 1.0
                if name == "ignore":
                    omega = 0.0
                elif name == "csl":
                    eta = kw.get("prior_threshold", 0.5)
                    if (b, c) in omega_l or (prior is not None and float(prior[c]) > eta):
                        omega = 0.0
                elif name == "csl-soft":
                    omega = 0.0 if (b, c) in omega_l else math.exp(-kw.get("prior_alpha", 10.0) * float(prior[c]))
                total_loss = total_loss + _eq3_term(x[b, c], y, omega, gp, gn, gu, clip, detach)
    elif name == "wce":
        a, be, ga = kw.get("alpha", -4.45), kw.get("beta", 5.45), kw.get("gamma", 1.0)
        for b in range(bsz):
            n_ann = sum(1 for c in range(ncls) if tl[b][c] != 0)
            g = a * (n_ann / ncls) ** ga + be
            row = x.new_zeros(())
            for c in range(ncls):
                row = row + _eq3_term(x[b, c], tl[b][c], 0.0, 0, 0, 0, 0, True)
            total_loss = total_loss + g / ncls * row
    elif name == "an-ls":
        eps = kw.get("eps", 0.1)
        for b in range(bsz):
            for c in range(ncls):
                y = 1 - eps if tl[b][c] == 1 else eps
                p = torch.sigmoid(x[b, c])
                total_loss = total_loss - (y * torch.log(p) + (1 - y) * torch.log(1 - p))
    elif name == "hill":
        lamb, m, gamma = kw.get("lamb", 1.5), kw.get("margin", 1.0), kw.get("gamma", 2.0)
        for b in range(bsz):
            for c in range(ncls):
                z, y = x[b, c], tl[b][c]
                if y == 1:
                    pm = torch.sigmoid(z - m)
                    w = (1 - pm) ** gamma
                    total_loss = total_loss - (w.detach() if detach else w) * torch.log(pm)
                elif y == 0:
                    p = torch.sigmoid(z)
                    total_loss = total_loss + (lamb - p) * p ** 2
                else:
                    total_loss = total_loss - torch.log(1 - torch.sigmoid(z))
    elif name == "splc":
        tau, ce, m, gamma = kw.get("tau", 0.6), kw.get("change_epoch", 1), kw.get("margin", 1.0), kw.get("gamma", 2.0)
        for b in range(bsz):
            for c in range(ncls):
                z, y = x[b, c], tl[b][c]
                flipped = y == 0 and epoch >= ce and float(torch.sigmoid(z.detach())) > tau
                if y == 1 or flipped:
                    p = torch.sigmoid(z - m if y == 1 else z)
                    w = (1 - p) ** gamma
                    total_loss = total_loss - (w.detach() if detach else w) * torch.log(p)
                else:
                    p = torch.sigmoid(z)
                    w = p ** gamma
                    total_loss = total_loss - (w.detach() if detach else w) * torch.log(1 - p)
    elif name in ("ll-r", "ll-ct"):
        rate = min(kw.get("delta_rel", 0.002) * epoch, 1.0)
        k = math.ceil(rate * bsz * ncls - 1e-9)
        un = [(b, c) for b in range(bsz) for c in range(ncls) if tl[b][c] == 0]
        un.sort(key=lambda bc: -float(x.detach()[bc]))     # largest -log(1 - p) first
        chosen = set(un[:k])
        for b in range(bsz):
            for c in range(ncls):
                p = torch.sigmoid(x[b, c])
                if tl[b][c] == 1 or ((b, c) in chosen and name == "ll-ct"):
                    total_loss = total_loss - torch.log(p)
                elif (b, c) not in chosen:
                    total_loss = total_loss - torch.log(1 - p)
    elif name == "pseudo":
        q, m, gf, low, seed = (kw.get("q", 1.0), kw.get("m", 3.0), kw.get("gamma_floor", 0.05),
                               kw.get("low", 0.1), kw.get("seed", 0))
        sel = [[tl[b][c] == 0 for c in range(ncls)] for b in range(bsz)]
        if q < 1:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            draw = torch.rand(bsz, ncls, generator=gen)
            sel = [[sel[b][c] and float(draw[b, c]) < q for c in range(ncls)] for b in range(bsz)]
        npos = sum(1 for r in tl for v in r if v == 1)
        nann = sum(1 for r in tl for v in r if v != 0)
        beta = max(npos / nann if nann else 0.0, gf)
        alpha = 1 - beta
        d = 1.0 if total is None else math.exp((epoch + m) / total - 1)
        for b in range(bsz):
            n_e = max(1, sum(1 for c in range(ncls) if tl[b][c] != 0))
            n_ne = max(1, sum(1 for c in range(ncls) if sel[b][c]))
            pen = 2.0 if all(float(torch.sigmoid(x.detach()[b, c])) <= low for c in range(ncls)) else 1.0
            pos_part, neg_part = 0.0, 0.0
            for c in range(ncls):
                lp, lq = F.logsigmoid(x[b, c]), F.logsigmoid(-x[b, c])
                if tl[b][c] != 0:
                    y = 1.0 if tl[b][c] == 1 else 0.0
                    pos_part = pos_part + y * lp / n_e
                    neg_part = neg_part + (1 - y) * lq / n_e
                elif sel[b][c]:
                    yt = 0.5 if pseudo is None else float(pseudo[b, c])
                    pos_part = pos_part + d * yt * lp / n_ne
                    neg_part = neg_part + d * (1 - yt) * lq / n_ne
            total_loss = total_loss - pen * (alpha * pos_part + beta * neg_part)
    else:
        raise AssertionError(name)
    return total_loss / bsz if reduction == "mean" else total_loss


def tl_tensor(tl):
    return torch.tensor(tl)


def check_against_reference(name, seed=0, epoch=0, total=None, reduction="sum", pseudo=None,
                            use_prior=False, **kw):
    logits, targets, prior = make_batch(seed)
    kwargs = dict(kw)
    if use_prior:
        kwargs["prior"] = prior
    loss_fn = build_loss(name, reduction=reduction, **kwargs)
    if total is not None:
        loss_fn.set_epoch(epoch, total)
    extra = {} if pseudo is None else {"pseudo": pseudo}
    value = loss_fn(logits, targets, **extra) if name == "pseudo" else loss_fn(logits, targets)
    (grad,) = torch.autograd.grad(value, logits)

    x_ref = logits.detach().clone().requires_grad_()
    expected = ref_loss(name, x_ref, targets, prior=prior if use_prior else None, epoch=epoch,
                        total=total, pseudo=pseudo, reduction=reduction, **kw)
    (grad_ref,) = torch.autograd.grad(expected, x_ref)
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=1e-4, atol=1e-6)
    return value


CASES = [
    ("ignore", {}, {}),
    ("negative", {}, {}),
    ("wce", {}, {}),
    ("focal", {"gamma": 2.0}, {}),
    ("focal", {"gamma": 1.5, "detach_focus": False}, {}),
    ("asl", {}, {}),
    ("asl", {"gamma_pos": 1.0, "gamma_neg": 3.0, "clip": 0.1, "detach_focus": False}, {}),
    ("pasl", {}, {}),
    ("pasl", {"gamma_pos": 1.0, "gamma_neg": 2.0, "gamma_unann": 7.0, "clip": 0.05}, {}),
    ("pasl", {"gamma_neg": 2.5, "detach_focus": False}, {}),
    ("csl", {"likelihood_topk": 2}, {}),
    ("csl", {"likelihood_topk": 2, "prior_threshold": 0.5}, {"use_prior": True}),
    ("csl", {"likelihood_topk": 1, "topk_scope": "batch"}, {"use_prior": True}),
    ("csl", {"likelihood_topk": 3, "clip": 0.05, "detach_focus": False}, {"use_prior": True}),
    ("csl-soft", {"likelihood_topk": 2, "prior_alpha": 3.0}, {"use_prior": True}),
    ("an-ls", {}, {}),
    ("hill", {}, {}),
    ("hill", {"detach_focus": False}, {}),
    ("splc", {}, {"epoch": 0, "total": 5}),
    ("splc", {"tau": 0.3}, {"epoch": 2, "total": 5}),
    ("ll-r", {"delta_rel": 0.1}, {"epoch": 2, "total": 5}),
    ("ll-ct", {"delta_rel": 0.1}, {"epoch": 3, "total": 5}),
    ("ll-r", {}, {"epoch": 0, "total": 5}),
    ("pseudo", {}, {}),
    ("pseudo", {"m": 2.0}, {"epoch": 1, "total": 6}),
    ("pseudo", {"q": 0.5, "seed": 3}, {"epoch": 2, "total": 4}),
]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name,params,opts", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_loop_reference(name, params, opts, reduction):
    check_against_reference(name, reduction=reduction, **opts, **params)


def test_pseudo_with_given_pseudo_labels_matches_reference():
    pseudo = torch.rand(B, C, generator=torch.Generator().manual_seed(5))
    check_against_reference("pseudo", pseudo=pseudo, epoch=1, total=3, q=0.7)


def test_every_registered_loss_is_covered_by_a_reference_case():
    assert {c[0] for c in CASES} == set(LOSSES)


# ----------------------------------------------------------------------------- the walk between modes

def test_csl_k0_without_prior_equals_pasl():
    logits, targets, _ = make_batch(1)
    kw = dict(gamma_pos=1.0, gamma_neg=2.0, gamma_unann=4.0)
    a = build_loss("csl", likelihood_topk=0, **kw)(logits, targets)
    b = build_loss("pasl", **kw)(logits, targets)
    torch.testing.assert_close(a, b)


def test_csl_k_equals_c_is_ignore_mode_pasl():
    logits, targets, _ = make_batch(2)
    kw = dict(gamma_pos=1.0, gamma_neg=2.0, gamma_unann=4.0)
    a = build_loss("csl", likelihood_topk=C, **kw)(logits, targets)
    # Ignore-mode P-ASL: no un-annotated term at all.
    annotated = targets.clone()
    expected = ref_loss("pasl", logits.detach().clone(), annotated, **kw) - sum(
        _eq3_term(logits.detach().double()[b, c], 0, 1.0, 1.0, 2.0, 4.0, 0.0, True)
        for b in range(B) for c in range(C) if targets[b, c] == 0)
    torch.testing.assert_close(a.double(), expected, rtol=1e-5, atol=1e-5)
    # with zero gammas it is exactly the ``ignore`` baseline
    z = dict(gamma_pos=0.0, gamma_neg=0.0, gamma_unann=0.0)
    torch.testing.assert_close(build_loss("csl", likelihood_topk=C, **z)(logits, targets),
                               build_loss("ignore")(logits, targets))


def test_csl_prior_above_every_threshold_ignores_all_unannotated():
    logits, targets, _ = make_batch(3)
    prior = torch.full((C,), 0.9)
    a = build_loss("csl", prior=prior, likelihood_topk=0, prior_threshold=0.5)(logits, targets)
    b = build_loss("csl", likelihood_topk=C)(logits, targets)
    torch.testing.assert_close(a, b)


def test_batch_scope_differs_from_sample_scope_and_ignores_k_times_b():
    logits, targets, _ = make_batch(4)
    t = torch.zeros_like(targets)
    sample = build_loss("csl", likelihood_topk=1, gamma_unann=0.0, gamma_neg=0.0)
    batch = build_loss("csl", likelihood_topk=1, gamma_unann=0.0, gamma_neg=0.0, topk_scope="batch")
    neg = build_loss("negative")
    x = logits.detach()
    # with every label un-annotated, both scopes drop exactly B labels from Negative mode
    top_rows = x.max(dim=1).values
    torch.testing.assert_close(neg(x, t) - sample(x, t), F.softplus(top_rows).sum())
    top_batch = x.reshape(-1).topk(B).values
    torch.testing.assert_close(neg(x, t) - batch(x, t), F.softplus(top_batch).sum())


# ----------------------------------------------------------------------------- reductions, dtypes, edges

def _build(name, prior):
    if name == "csl-soft":
        return build_loss(name, prior=prior)
    if name == "csl":
        return build_loss(name, prior=prior, likelihood_topk=2)
    return build_loss(name)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mean_is_sum_over_batch(name):
    logits, targets, prior = make_batch(6)
    s = build_loss(name, **({"prior": prior} if name == "csl-soft" else {}))
    m = build_loss(name, reduction="mean", **({"prior": prior} if name == "csl-soft" else {}))
    for fn in (s, m):
        fn.set_epoch(2, 4)
    torch.testing.assert_close(m(logits, targets), s(logits, targets) / B)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_is_finite_and_close_to_fp32(name):
    logits, targets, prior = make_batch(7, b=16, c=64)
    fn = _build(name, prior[:1].expand(64).clone() if name.startswith("csl") else prior)
    fn.set_epoch(1, 4)
    x16 = logits.detach().to(torch.bfloat16).requires_grad_()
    v16 = fn(x16, targets)
    v16.backward()
    v32 = fn(x16.detach().float(), targets)        # the same (rounded) logits in fp32
    assert v16.dtype == torch.float32 and torch.isfinite(v16)
    assert x16.grad.dtype == torch.bfloat16 and torch.isfinite(x16.grad.float()).all()
    torch.testing.assert_close(v16, v32, rtol=1e-5, atol=1e-5)
    # extreme logits: bf16's range is fp32's; still no NaN or inf
    xe = (torch.randn(16, 64) * 1e4).to(torch.bfloat16).requires_grad_()
    ve = fn(xe, targets)
    ve.backward()
    assert torch.isfinite(ve) and torch.isfinite(xe.grad.float()).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_rows_all_unannotated_and_all_annotated(name):
    logits, _, prior = make_batch(8)
    fn = _build(name, prior)
    fn.set_epoch(1, 3)
    for targets in (torch.zeros(B, C, dtype=torch.int8),
                    torch.where(torch.rand(B, C) > 0.5, 1, -1).to(torch.int8)):
        x = logits.detach().clone().requires_grad_()
        v = fn(x, targets)
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(x.grad).all()
    if name in ("ignore", "wce"):
        assert fn(logits, torch.zeros(B, C, dtype=torch.int8)) == 0


def test_c9600_smoke():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 9600, generator=g) - 3).requires_grad_()
    t = torch.zeros(8, 9600, dtype=torch.int8)
    t[:, :4], t[:, 4:8] = 1, -1
    prior = torch.rand(9600, generator=g) * 0.2
    prior[:50] = 0.9
    fn = build_loss("csl", prior=prior, likelihood_topk=5, prior_threshold=0.5)
    v = fn(x, t)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(x.grad).all()
    assert (x.grad[:, 8:50] == 0).all()                              # Omega_P
    assert ((x.grad[:, 50:] == 0).sum(dim=1) == 5).all()             # Omega_L: K per image


def test_prior_is_a_buffer():
    prior = torch.rand(C)
    fn = build_loss("csl", prior=prior.tolist())
    assert "prior" in dict(fn.named_buffers()) and "prior" in fn.state_dict()
    assert fn.prior.dtype == torch.float32
    torch.testing.assert_close(fn.prior, prior)
    assert fn.to(torch.float64).prior.dtype == torch.float64   # moves with the module


def test_pseudo_schedule_and_penalty():
    fn = build_loss("pseudo", m=3.0)
    assert fn.dynamic_weight() == 1.0                     # before set_epoch
    fn.set_epoch(7, 10)
    assert fn.dynamic_weight() == pytest.approx(1.0)      # e_T - m
    fn.set_epoch(2, 10)
    assert fn.dynamic_weight() < 1.0
    t = torch.zeros(2, C, dtype=torch.int8)
    t[:, 0] = 1
    low = torch.full((2, C), -5.0)                        # every prediction below 0.1
    high = low.clone()
    high[:, 3] = 5.0
    penalised, plain = build_loss("pseudo"), build_loss("pseudo", low=1e-6)
    torch.testing.assert_close(penalised(low, t), 2 * plain(low, t))      # eq. (10): p = 2
    torch.testing.assert_close(penalised(high, t), plain(high, t))        # p = 1


def test_pseudo_q_sampling_is_seeded():
    logits, targets, _ = make_batch(9)
    a, b = build_loss("pseudo", q=0.3, seed=1), build_loss("pseudo", q=0.3, seed=1)
    torch.testing.assert_close(a(logits, targets), b(logits, targets))
    c = build_loss("pseudo", q=0.3, seed=2)
    assert not torch.equal(a(logits, targets), c(logits, targets))


# ----------------------------------------------------------------------------- errors

def test_bad_name_lists_valid_ones():
    with pytest.raises(ValueError, match="'cls'") as err:
        build_loss("cls")
    for name in LOSSES:
        assert name in str(err.value)


def test_bad_parameter_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError, match="'likelihood_top_k'") as err:
        build_loss("csl", likelihood_top_k=5)
    assert "likelihood_topk" in str(err.value) and "prior_threshold" in str(err.value)
    assert "likelihood_topk" in loss_params("csl")


@pytest.mark.parametrize("name,params,word", [
    ("focal", {"gamma": -1.0}, "gamma"),
    ("csl", {"likelihood_topk": -1}, "likelihood_topk"),
    ("csl", {"likelihood_topk": 2.5}, "likelihood_topk"),
    ("csl", {"prior_threshold": 1.5}, "prior_threshold"),
    ("csl", {"topk_scope": "global"}, "topk_scope"),
    ("asl", {"clip": "0.05"}, "clip"),
    ("ignore", {"reduction": "avg"}, "reduction"),
    ("pseudo", {"q": 0.0}, "'q'"),
    ("ll-r", {"delta_rel": -0.1}, "delta_rel"),
])
def test_bad_values_name_the_parameter(name, params, word):
    with pytest.raises(ValueError, match=word):
        build_loss(name, **params)


def test_prior_errors():
    with pytest.raises(ValueError, match="prior"):
        build_loss("csl-soft")
    with pytest.raises(ValueError, match="does not use a prior"):
        build_loss("asl", prior=torch.rand(C))
    with pytest.raises(ValueError, match="prior"):
        build_loss("csl", prior=[0.5, 1.5])
    fn = build_loss("csl", prior=torch.rand(C + 1))
    logits, targets, _ = make_batch(0)
    with pytest.raises(ValueError, match="prior has"):
        fn(logits, targets)


def test_input_errors():
    fn = build_loss("csl")
    logits, targets, _ = make_batch(0)
    with pytest.raises(ValueError, match="integer"):
        fn(logits, targets.float())
    with pytest.raises(ValueError, match="shape"):
        fn(logits, targets[:, :3])
    with pytest.raises(ValueError, match="epoch"):
        fn.set_epoch(-1, 3)
