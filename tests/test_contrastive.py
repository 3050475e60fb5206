import math

import pytest
import torch
import torch.nn.functional as F

from clcalib.config import ClCalib
from clcalib.recon.terms.contrastive import (
    ContrastiveLoss,
    _negative_mask,
    build_bank,
    contrastive_loss,
    contrastive_parts,
    embed,
    flatten,
    get_mapping,
    pool,
)

# ----------------------------------------------------------------------------- references


def _unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _h(s: float, ratio: float) -> float:
    return math.exp(s) / (math.exp(s) + ratio)


def _ref_direction(anchors, positives, keys, negatives_of, tau, critic, calib_size):
    """Float64 reference, one anchor at a time, straight from the formulas.
    negatives_of[i]: list of key rows that are negatives of anchor i."""
    total = 0.0
    for i, a in enumerate(anchors):
        s_pos = _dot(a, positives[i]) / tau
        s_neg = [_dot(a, keys[j]) / tau for j in negatives_of[i]]
        if critic == "nce":
            ratio = len(s_neg) / calib_size
            total -= math.log(_h(s_pos, ratio)) + sum(math.log(1.0 - _h(s, ratio)) for s in s_neg)
        else:
            denom = math.exp(s_pos) + sum(math.exp(s) for s in s_neg)
            total += -(s_pos - math.log(denom))
    return total / len(anchors)


def _ref_loss(e_q, e_f, *, tau, critic, calib_size, bank=None, bank_index=None, symmetric=False):
    q, f = e_q.tolist(), e_f.tolist()
    n = len(q)
    ids = list(range(n)) if bank_index is None else bank_index.tolist()
    if bank is None:
        keys, negs = f, [[j for j in range(n) if ids[j] != ids[i]] for i in range(n)]
    else:
        keys = bank.tolist()
        negs = [[k for k in range(len(keys)) if k != ids[i]] for i in range(n)]
    loss = _ref_direction(q, f, keys, negs, tau, critic, calib_size)
    if symmetric:
        negs_q = [[j for j in range(n) if ids[j] != ids[i]] for i in range(n)]
        loss = 0.5 * (loss + _ref_direction(f, q, q, negs_q, tau, critic, calib_size))
    return loss


def _rand_embed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return embed(torch.randn(*shape, generator=g, dtype=torch.float64))


# ----------------------------------------------------------------------------- mappings


def test_pool_flatten_embed_shapes_and_norms():
    z = torch.randn(4, 3, 5, 6)
    assert pool(z).shape == (4, 3)
    torch.testing.assert_close(pool(z), z.mean(dim=(2, 3)))
    assert pool(z[:, :, 0, 0]) is not None and torch.equal(pool(z[:, :, 0, 0]), z[:, :, 0, 0])
    assert flatten(z).shape == (4, 90)
    e = embed(z)
    assert e.shape == (4, 90)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4))
    assert torch.equal(embed(torch.zeros(2, 3)), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        pool(torch.randn(4))


def test_get_mapping():
    assert get_mapping("pool") is pool and get_mapping("flatten") is flatten
    tail = torch.nn.Linear(3, 2)
    assert get_mapping("fp_tail", tail) is tail
    with pytest.raises(ValueError, match="fp_tail"):
        get_mapping("fp_tail")
    with pytest.raises(ValueError, match="mapping must be one of"):
        get_mapping("avg")  # type: ignore[arg-type]


def test_build_bank_matches_embedding_of_all_samples():
    z_f = torch.randn(10, 3, 4, 4)
    bank = build_bank(z_f, pool, batch_size=3)
    torch.testing.assert_close(bank, embed(pool(z_f)))
    assert not bank.requires_grad
    torch.testing.assert_close(build_bank(list(z_f.split(4)), pool), bank)


# ----------------------------------------------------------------------------- values


def test_nce_hand_computed_three_samples_2d():
    # e_q_i at angle a_i + 0.1, e_f_i at angle a_i; N = 2 negatives per anchor, M = 8
    angles = [0.0, 1.0, 2.5]
    e_f = torch.tensor([_unit(a) for a in angles], dtype=torch.float64)
    e_q = torch.tensor([_unit(a + 0.1) for a in angles], dtype=torch.float64)
    tau, m = 0.5, 8
    expected = 0.0
    for i in range(3):
        s_pos = math.cos(0.1)  # cos of the angle between e_q_i and e_f_i
        h_pos = math.exp(s_pos / tau) / (math.exp(s_pos / tau) + 2 / m)
        term = math.log(h_pos)
        for j in range(3):
            if j != i:
                s = math.cos(angles[i] + 0.1 - angles[j])
                h = math.exp(s / tau) / (math.exp(s / tau) + 2 / m)
                term += math.log(1 - h)
        expected -= term / 3
    got = contrastive_loss(e_q, e_f, tau=tau, critic="nce", calib_size=m)
    assert got.dim() == 0 and got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_infonce_hand_computed_and_equal_to_cross_entropy():
    angles = [0.0, 1.0, 2.5]
    e_f = torch.tensor([_unit(a) for a in angles], dtype=torch.float64)
    e_q = torch.tensor([_unit(a + 0.3) for a in angles], dtype=torch.float64)
    tau = 0.2
    expected = 0.0
    for i in range(3):
        logits = [math.cos(angles[i] + 0.3 - angles[j]) / tau for j in range(3)]
        expected -= (logits[i] - math.log(sum(math.exp(v) for v in logits))) / 3
    got = contrastive_loss(e_q, e_f, tau=tau, critic="infonce", calib_size=1024)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # the classic formulation: cross-entropy of the diagonal of e_q e_f^T / tau
    e_q, e_f = _rand_embed(6, 5, seed=1), _rand_embed(6, 5, seed=2)
    ce = F.cross_entropy(e_q @ e_f.T / tau, torch.arange(6))
    torch.testing.assert_close(
        contrastive_loss(e_q, e_f, tau=tau, critic="infonce", calib_size=6), ce
    )


@pytest.mark.parametrize("critic", ["nce", "infonce"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("use_bank", [False, True])
def test_matches_float64_reference(critic, symmetric, use_bank):
    e_q, e_f = _rand_embed(4, 5, seed=3), _rand_embed(4, 5, seed=4)
    kw = {"tau": 0.7, "critic": critic, "calib_size": 10, "symmetric": symmetric}
    if use_bank:
        bank = _rand_embed(10, 5, seed=5)
        idx = torch.tensor([7, 2, 9, 0])
        bank[idx] = e_f  # exact bank: row k is sample k's FP embedding
        kw.update(bank=bank, bank_index=idx)
    got = contrastive_loss(e_q, e_f, **kw)
    assert got.item() == pytest.approx(_ref_loss(e_q, e_f, **kw), rel=1e-10)
    assert got.item() > 0


def test_nce_is_stable_at_small_temperature():
    e_q, e_f = _rand_embed(8, 4, seed=6), _rand_embed(8, 4, seed=7)
    e_q.requires_grad_(True)
    loss = contrastive_loss(e_q.float(), e_f.float(), tau=1e-3, critic="nce", calib_size=1024)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e_q.grad).all()


# ----------------------------------------------------------------------------- negatives


@pytest.mark.parametrize("critic", ["nce", "infonce"])
def test_bank_negatives_exclude_the_anchor_itself(critic):
    e_q, e_f = _rand_embed(1, 3, seed=8), _rand_embed(1, 3, seed=9)
    bank = _rand_embed(6, 3, seed=10)
    idx = torch.tensor([4])
    bank[4] = e_f[0]
    kw = {"tau": 0.5, "critic": critic, "calib_size": 6, "bank_index": idx}
    base = contrastive_loss(e_q, e_f, bank=bank, **kw)
    other = bank.clone()
    other[4] = e_q[0]  # a negative identical to the anchor would change the loss a lot
    assert torch.equal(contrastive_loss(e_q, e_f, bank=other, **kw), base)
    other = bank.clone()
    other[1] = e_q[0]
    assert contrastive_loss(e_q, e_f, bank=other, **kw) > base


@pytest.mark.parametrize("critic", ["nce", "infonce"])
def test_bank_equal_to_batch_gives_batch_loss(critic):
    e_q, e_f = _rand_embed(5, 4, seed=11), _rand_embed(5, 4, seed=12)
    kw = {"tau": 0.5, "critic": critic, "calib_size": 5}
    torch.testing.assert_close(
        contrastive_loss(e_q, e_f, bank=e_f, bank_index=torch.arange(5), **kw),
        contrastive_loss(e_q, e_f, **kw),
    )


def test_duplicate_samples_in_a_batch_are_not_negatives_of_each_other():
    e_f = _rand_embed(3, 4, seed=13)
    e_f = torch.cat([e_f, e_f[:1]])  # sample 0 drawn twice
    e_q = _rand_embed(4, 4, seed=14)
    ids = torch.tensor([5, 1, 2, 5])
    kw = {"tau": 0.5, "critic": "nce", "calib_size": 16}
    got = contrastive_loss(e_q, e_f, bank_index=ids, **kw)
    assert got.item() == pytest.approx(_ref_loss(e_q, e_f, bank_index=ids, **kw), rel=1e-10)


def test_num_negatives_sampling_is_seeded_and_exact():
    e_q, e_f = _rand_embed(4, 5, seed=15), _rand_embed(4, 5, seed=16)
    bank = _rand_embed(32, 5, seed=17)
    idx = torch.tensor([3, 30, 11, 12])
    bank[idx] = e_f
    kw = {"tau": 0.5, "critic": "nce", "calib_size": 32, "bank": bank, "bank_index": idx}

    def run(seed, k=5):
        return contrastive_loss(
            e_q, e_f, num_negatives=k, generator=torch.Generator().manual_seed(seed), **kw
        )

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    # >= all eligible negatives: the full loss
    torch.testing.assert_close(run(0, k=31), contrastive_loss(e_q, e_f, **kw))
    torch.testing.assert_close(run(0, k=1000), contrastive_loss(e_q, e_f, **kw))

    # the mask behind run(0): k per anchor, never the anchor's own row; N of the critic = k
    mask = _negative_mask(idx, torch.arange(32), 5, torch.Generator().manual_seed(0))
    assert mask.sum(dim=1).tolist() == [5, 5, 5, 5]
    assert not mask[torch.arange(4), idx].any()
    negs = [torch.nonzero(row).flatten().tolist() for row in mask]
    ref = _ref_direction(e_q.tolist(), e_f.tolist(), bank.tolist(), negs, 0.5, "nce", 32)
    assert run(0).item() == pytest.approx(ref, rel=1e-10)


def test_num_negatives_in_batch_mode_with_symmetric():
    e_q, e_f = _rand_embed(8, 5, seed=18), _rand_embed(8, 5, seed=19)
    kw = {"tau": 0.5, "critic": "infonce", "calib_size": 64, "symmetric": True, "num_negatives": 3}
    a = contrastive_loss(e_q, e_f, generator=torch.Generator().manual_seed(2), **kw)
    b = contrastive_loss(e_q, e_f, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and torch.isfinite(a)
    mask = _negative_mask(torch.arange(8), torch.arange(8), 3, torch.Generator().manual_seed(2))
    assert mask.sum(dim=1).tolist() == [3] * 8 and not mask.diagonal().any()


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("critic", ["nce", "infonce"])
@pytest.mark.parametrize("use_bank", [False, True])
def test_invariant_to_a_consistent_permutation_of_the_batch(critic, use_bank):
    e_q, e_f = _rand_embed(6, 5, seed=20), _rand_embed(6, 5, seed=21)
    idx = torch.tensor([0, 5, 9, 3, 7, 1])
    bank = _rand_embed(10, 5, seed=22)
    bank[idx] = e_f
    kw = {"tau": 0.5, "critic": critic, "calib_size": 10, "symmetric": True}
    if use_bank:
        kw.update(bank=bank)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = contrastive_loss(e_q, e_f, bank_index=idx, **kw)
    b = contrastive_loss(e_q[perm], e_f[perm], bank_index=idx[perm], **kw)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mapping", ["pool", "flatten"])
def test_infonce_loss_falls_as_zq_approaches_zf(mapping):
    g = torch.Generator().manual_seed(23)
    z_f = torch.randn(8, 32, 3, 3, generator=g)
    noise = torch.randn(8, 32, 3, 3, generator=g)
    m = get_mapping(mapping)
    e_f = embed(m(z_f))
    losses = [
        contrastive_loss(embed(m(z_f + t * noise)), e_f, tau=0.5, critic="infonce", calib_size=64)
        for t in (2.0, 1.0, 0.5, 0.25, 0.1, 0.0)
    ]
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False)), losses


@pytest.mark.parametrize("critic", ["nce", "infonce"])
@pytest.mark.parametrize("use_bank", [False, True])
def test_loss_falls_as_zq_approaches_zf_with_negatives_held_fixed(critic, use_bank):
    """z_q moves towards z_f in the e1-e2 plane; every negative lies along +-e3, so only the
    positive pair changes and both critics must reward it monotonically."""
    e_f = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    bank = torch.cat([e_f, torch.tensor([[0.0, 0.0, 1.0]] * 3, dtype=torch.float64)])
    kw = {"tau": 0.5, "critic": critic, "calib_size": 6}
    if use_bank:
        kw.update(bank=bank, bank_index=torch.arange(1))
    losses = []
    for t in (1.0, 0.7, 0.4, 0.2, 0.0):  # z_q of sample 0: from e2 to e1
        z_q = torch.tensor([[1.0 - t, t, 0.0]], dtype=torch.float64)
        if use_bank:
            losses.append(contrastive_loss(embed(z_q), e_f[:1], **kw))
        else:
            e_q = torch.cat([embed(z_q), e_f[1:]])
            losses.append(contrastive_loss(e_q, e_f, **kw))
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False)), losses


@pytest.mark.parametrize("use_bank", [False, True])
def test_nce_minimum_is_not_at_zq_equal_zf_when_fp_embeddings_are_aligned(use_bank):
    """A property of the CMIM critic, pinned so it stays visible: with N/M < 1 the positive term
    saturates (h(i,i) ~ 1) while each negative costs ~ softplus(s/tau - log(N/M)), so the sum
    over negatives dominates. When FP embeddings of different samples are aligned (pooled
    post-ReLU features: cosine ~ 0.9), moving e_q away from them lowers L_CL below its value at
    a perfect quantization (e_q = e_f)."""
    g = torch.Generator().manual_seed(0)
    z_f = torch.relu(torch.randn(16, 32, 4, 4, generator=g) + 0.3)
    e_f = embed(pool(z_f))
    kw = {"tau": 0.5, "critic": "nce", "calib_size": 16}
    if use_bank:
        kw.update(bank=e_f, bank_index=torch.arange(16))
    at_target = contrastive_loss(e_f, e_f, **kw)
    away = embed(e_f - 0.5 * e_f.mean(dim=0, keepdim=True))  # pushed away from the others
    assert contrastive_loss(away, e_f, **kw) < at_target
    assert (away * e_f).sum(dim=1).min() > 0.5  # still close to its own target


def _round_ste(x):
    return (x.round() - x).detach() + x


@pytest.mark.parametrize("critic", ["nce", "infonce", "relational"])
def test_gradients_reach_step_sizes_and_rounding_variables(critic):
    """A quantized linear unit: AdaRound-style weights (rounding variables alpha) and an LSQ-style
    activation quantizer (learnable step size); the FP tail is a frozen linear layer."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    w = torch.randn(6, 8)
    w_step = w.abs().amax(dim=1, keepdim=True) / 7
    alpha = torch.zeros_like(w, requires_grad=True)
    a_step = torch.tensor(0.1, requires_grad=True)

    def h(a):  # rectified sigmoid of AdaRound
        return torch.clamp(torch.sigmoid(a) * 1.2 - 0.1, 0, 1)

    w_q = w_step * torch.clamp(torch.floor(w / w_step) + h(alpha), -8, 7)
    z_q = x @ w_q.T
    z_q = a_step * torch.clamp(_round_ste(z_q / a_step), -8, 7)  # activation fake-quant
    z_f = x @ w.T

    tail = torch.nn.Linear(6, 4)
    tail.requires_grad_(False)
    for name, fp_tail in (("fp_tail", tail), ("pool", None)):
        alpha.grad, a_step.grad = None, None
        loss_fn = ContrastiveLoss.from_config(
            ClCalib(enabled=True, mapping=name, negatives="batch", critic=critic), calib_size=16
        )
        g = get_mapping(name, fp_tail)
        loss = loss_fn(embed(g(z_q)), embed(g(z_f)).detach())
        loss.backward(retain_graph=True)
        assert alpha.grad is not None and a_step.grad is not None
        assert torch.isfinite(alpha.grad).all() and alpha.grad.abs().sum() > 0, name
        assert torch.isfinite(a_step.grad) and a_step.grad != 0, name
    assert tail.weight.grad is None


# ----------------------------------------------------------------------------- config + errors


def test_from_config_carries_settings_and_requires_a_bank():
    cfg = ClCalib(enabled=True, **{"lambda": 0.3}, tau=0.2, critic="infonce", negatives="bank", num_negatives=7)
    loss = ContrastiveLoss.from_config(cfg, calib_size=128)
    assert (loss.tau, loss.critic, loss.use_bank, loss.num_negatives) == (0.2, "infonce", True, 7)
    assert loss.calib_size == 128
    e_q, e_f = _rand_embed(4, 3, seed=24), _rand_embed(4, 3, seed=25)
    with pytest.raises(ValueError, match="no bank was given"):
        loss(e_q, e_f)
    bank = torch.cat([e_f, _rand_embed(4, 3, seed=26)])
    out = loss(
        e_q, e_f, bank=bank, bank_index=torch.arange(4), generator=torch.Generator().manual_seed(0)
    )
    assert out.dim() == 0 and torch.isfinite(out)


def test_bad_arguments_say_what_is_wrong():
    e = _rand_embed(3, 2)
    with pytest.raises(ValueError, match="critic must be one of"):
        contrastive_loss(e, e, tau=0.5, critic="ce", calib_size=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tau must be > 0"):
        contrastive_loss(e, e, tau=0.0, critic="nce", calib_size=3)
    with pytest.raises(ValueError, match="need bank_index"):
        contrastive_loss(e, e, tau=0.5, critic="nce", calib_size=3, bank=e)
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(e, e[:2], tau=0.5, critic="nce", calib_size=3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        contrastive_loss(e[:1], e[:1], tau=0.5, critic="nce", calib_size=3)
    with pytest.raises(ValueError, match="embedding size"):
        contrastive_loss(
            e,
            e,
            tau=0.5,
            critic="nce",
            calib_size=3,
            bank=torch.zeros(3, 4),
            bank_index=torch.arange(3),
        )


def test_float32_inputs_and_dtype():
    e_q, e_f = _rand_embed(5, 4, seed=27).float(), _rand_embed(5, 4, seed=28).float()
    out = contrastive_loss(e_q, e_f, tau=0.5, critic="nce", calib_size=64)
    assert out.dtype == torch.float32
    ref = contrastive_loss(e_q.double(), e_f.double(), tau=0.5, critic="nce", calib_size=64)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


# ----------------------------------------------------------------------------- relational (issue 17)


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _ref_relational(e_q, e_f, *, tau, keys=None, key_ids=None, ids=None):
    """Float64 reference of KL(softmax_j(e_f_i.k_j/tau) || softmax_j(e_q_i.k_j/tau)), averaged
    over anchors i; keys k: the FP batch (own sample included) or a bank."""
    q, f = e_q.tolist(), e_f.tolist()
    keys = f if keys is None else keys.tolist()
    total = 0.0
    for i in range(len(q)):
        p_t = _softmax([_dot(f[i], k) / tau for k in keys])
        p_q = _softmax([_dot(q[i], k) / tau for k in keys])
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_q, strict=True))
    return total / len(q)


def test_relational_hand_computed_three_samples_2d():
    """Three samples on the unit circle; by hand: logits of anchor i against the FP keys."""
    tau = 0.5
    e_f = torch.tensor([_unit(0.0), _unit(1.0), _unit(2.5)], dtype=torch.float64)
    e_q = torch.tensor([_unit(0.3), _unit(0.8), _unit(2.5)], dtype=torch.float64)
    want = 0.0
    for i in range(3):
        a_f = [0.0, 1.0, 2.5][i]
        a_q = [0.3, 0.8, 2.5][i]
        t = [math.cos(a_f - b) / tau for b in (0.0, 1.0, 2.5)]
        s = [math.cos(a_q - b) / tau for b in (0.0, 1.0, 2.5)]
        pt, pq = _softmax(t), _softmax(s)
        want += sum(a * math.log(a / b) for a, b in zip(pt, pq, strict=True))
    want /= 3
    got = contrastive_loss(e_q, e_f, tau=tau, critic="relational", calib_size=1024)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # sample 2 is exact: it alone would contribute 0
    alone = contrastive_loss(e_q[2:], e_f[2:], tau=tau, critic="relational", calib_size=1024,
                             bank=e_f, bank_index=torch.tensor([2]))
    assert alone.item() == pytest.approx(0.0, abs=1e-14)


@pytest.mark.parametrize("use_bank", [False, True])
def test_relational_matches_float64_reference(use_bank):
    e_q, e_f = _rand_embed(4, 5, seed=3), _rand_embed(4, 5, seed=4)
    kw = {"tau": 0.7, "critic": "relational", "calib_size": 10}
    ref_kw = {"tau": 0.7}
    if use_bank:
        bank = _rand_embed(10, 5, seed=5)
        idx = torch.tensor([7, 2, 9, 0])
        bank[idx] = e_f
        kw.update(bank=bank, bank_index=idx)
        ref_kw.update(keys=bank)
    got = contrastive_loss(e_q, e_f, **kw)
    assert got.item() == pytest.approx(_ref_relational(e_q, e_f, **ref_kw), rel=1e-10)
    assert got.item() > 0


@pytest.mark.parametrize("critic", ["nce", "infonce", "relational"])
@pytest.mark.parametrize("use_bank", [False, True])
def test_parts_add_up_to_the_loss(critic, use_bank):
    e_q, e_f = _rand_embed(6, 5, seed=30), _rand_embed(6, 5, seed=31)
    kw = {"tau": 0.4, "critic": critic, "calib_size": 12, "symmetric": critic != "relational"}
    if use_bank:
        bank = _rand_embed(12, 5, seed=32)
        idx = torch.tensor([0, 3, 5, 7, 9, 11])
        bank[idx] = e_f
        kw.update(bank=bank, bank_index=idx)
    p = contrastive_parts(e_q, e_f, **kw)
    const = p.get("const", torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(p["pos"] + p["neg"] - const, p["loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p["loss"], contrastive_loss(e_q, e_f, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("use_bank", [False, True])
def test_relational_minimum_and_zero_gradient_at_zq_equal_zf(use_bank):
    """The form's purpose: 0 with zero gradient at e_q = e_f, even with aligned FP embeddings
    (the case where nce's minimum is elsewhere: the test above), and higher at every nearby
    point."""
    g = torch.Generator().manual_seed(0)
    z_f = torch.relu(torch.randn(16, 32, 4, 4, generator=g, dtype=torch.float64) + 0.3)
    e_f = embed(pool(z_f))
    kw = {"tau": 0.5, "critic": "relational", "calib_size": 16}
    if use_bank:
        kw.update(bank=e_f, bank_index=torch.arange(16))
    z = pool(z_f).clone().requires_grad_(True)
    loss = contrastive_loss(embed(z), e_f, **kw)
    (grad,) = torch.autograd.grad(loss, z)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert grad.abs().max().item() < 1e-12
    away = embed(e_f - 0.5 * e_f.mean(dim=0, keepdim=True))  # where nce is lower
    assert contrastive_loss(away, e_f, **kw) > loss
    for seed in range(5):
        d = torch.randn(16, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert contrastive_loss(embed(pool(z_f) + 0.05 * d), e_f, **kw) > loss


@pytest.mark.parametrize("mapping", ["pool", "flatten"])
@pytest.mark.parametrize("use_bank", [False, True])
def test_relational_rises_as_zq_moves_away_from_zf(mapping, use_bank):
    g = torch.Generator().manual_seed(23)
    z_f = torch.randn(8, 32, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(8, 32, 3, 3, generator=g, dtype=torch.float64)
    m = get_mapping(mapping)
    e_f = embed(m(z_f))
    kw = {"tau": 0.5, "critic": "relational", "calib_size": 8}
    if use_bank:
        kw.update(bank=e_f, bank_index=torch.arange(8))
    losses = [contrastive_loss(embed(m(z_f + t * noise)), e_f, **kw) for t in (0.0, 0.05, 0.1, 0.3, 1.0, 3.0)]
    assert losses[0].item() == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in zip(losses, losses[1:], strict=False)), losses


def test_relational_keys_include_the_anchor_own_sample_and_honour_num_negatives():
    e_q, e_f = _rand_embed(5, 4, seed=40), _rand_embed(5, 4, seed=41)
    bank = _rand_embed(20, 4, seed=42)
    idx = torch.tensor([3, 8, 11, 15, 19])
    bank[idx] = e_f
    kw = {"tau": 0.5, "critic": "relational", "calib_size": 20, "bank": bank, "bank_index": idx}
    full = contrastive_loss(e_q, e_f, **kw)
    torch.testing.assert_close(full, torch.tensor(_ref_relational(e_q, e_f, tau=0.5, keys=bank), dtype=torch.float64))
    # with sampled negatives: the keys are the sampled rows plus the own row
    gen = torch.Generator().manual_seed(0)
    got = contrastive_loss(e_q, e_f, num_negatives=4, generator=gen, **kw)
    mask = _negative_mask(idx, torch.arange(20), 4, torch.Generator().manual_seed(0))
    want = 0.0
    for i in range(5):
        rows = sorted(set(mask[i].nonzero().flatten().tolist()) | {int(idx[i])})
        want += _ref_relational(e_q[i : i + 1], e_f[i : i + 1], tau=0.5, keys=bank[rows])
    assert got.item() == pytest.approx(want / 5, rel=1e-10)


def test_relational_from_config():
    cfg = ClCalib(enabled=True, critic="relational", mapping="pool", **{"lambda": 10.0}, tau=0.1)
    loss = ContrastiveLoss.from_config(cfg, calib_size=64)
    assert (loss.critic, loss.tau) == ("relational", 0.1)
    e = _rand_embed(4, 3, seed=50)
    assert loss(e, e).item() == pytest.approx(0.0, abs=1e-12)
