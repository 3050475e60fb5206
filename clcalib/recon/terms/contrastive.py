"""CL-Calib's contrastive loss: critic, mapping and negatives. Pure functions on tensors.

For a reconstruction unit, ``z_q`` is its quantized output and ``z_f`` its FP output for the
same batch. A frozen, parameter-free mapping ``g`` (``fp_tail``: the frozen FP remainder of the
network, supplied by the engine; ``pool``; ``flatten``) followed by L2 normalisation turns both
into embeddings ``e_q = embed(g(z_q))``, ``e_f = embed(g(z_f))`` of shape N x D.

Positive pairs are ``(e_q_i, e_f_i)``. Negatives of anchor ``e_q_i`` are FP embeddings of *other
samples*: ``e_f_j`` (j != i) of the batch, or, with a bank (the FP embeddings of the whole
calibration set, M x D, exact since FP embeddings never change), every bank row except the
anchor's own sample. Similarities are dot products of the (unit-norm) embeddings, i.e. cosine
similarities.

Critics (``s`` a cosine similarity, ``tau`` the temperature):

* ``nce`` (CMIM): ``h(i,j) = e^{s_ij/tau} / (e^{s_ij/tau} + N/M)``, with N the number of
  negatives this anchor actually got and M the calibration-set size;
  ``L = -mean_i[log h(i,i) + sum_j log(1 - h(i,j))]``, computed as
  ``log h = logsigmoid(s/tau - log(N/M))`` and ``log(1-h) = logsigmoid(-(s/tau - log(N/M)))``.
* ``infonce``: cross-entropy of the positive logit among ``[s_ii, s_ij...] / tau``.
* ``relational``: contrastive distillation of the FP similarity structure. Over the
  keys K_i of anchor i (the FP embeddings of the batch, or of the bank, *its own sample
  included*), target ``p_f_i = softmax_j(e_f_i . e_f_j / tau)``, prediction
  ``p_q_i = softmax_j(e_q_i . e_f_j / tau)``, ``L = mean_i KL(p_f_i || p_q_i)``. This is
  infonce with the one-hot label replaced by the FP sample's own similarity profile: it is 0,
  with zero gradient, at ``e_q_i = e_f_i``, and grows as ``e_q_i`` moves relative to the other
  samples. ``nce`` and ``infonce`` with fixed FP negatives have their minimum elsewhere (below),
  which is why their value sits at a constant set by the FP geometry.

The loss is always >= 0. Nothing here prints or syncs with the device; every function returns a
tensor.

Caveat (a property of the critic, pinned by a test): with ``nce`` and N/M < 1 the positive term
saturates (h(i,i) ~ 1, almost no gradient) while every negative costs about
``softplus(s_ij/tau - log(N/M))``, so the sum over the N negatives dominates. Its minimum is
therefore not at ``e_q = e_f`` when FP embeddings of different samples are similar (pooled
post-ReLU features have cosine ~ 0.9): it pushes ``e_q_i`` away from the other samples'
embeddings, and with a bank of M = 1024 its value at a perfect quantization is ~1e3. ``infonce``
has the same tendency, but weakly (the weights of its negatives sum to 1 - p(positive)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from clcalib.config import ClCalib

__all__ = [
    "Critic",
    "MappingName",
    "ContrastiveLoss",
    "pool",
    "flatten",
    "embed",
    "get_mapping",
    "build_bank",
    "contrastive_loss",
    "contrastive_parts",
]

Critic = Literal["nce", "infonce", "relational"]
MappingName = Literal["fp_tail", "pool", "flatten"]
Mapping = Callable[[Tensor], Tensor]

_CRITICS = ("nce", "infonce", "relational")
_MAPPINGS = ("fp_tail", "pool", "flatten")


# --------------------------------------------------------------------------- mappings


def pool(z: Tensor) -> Tensor:
    """Global average pool over the spatial dims: (N, C, *spatial) -> (N, C); 2-D is returned as is."""
    if z.dim() < 2:
        raise ValueError(f"pool expects a batch of shape (N, C, ...), got shape {tuple(z.shape)}")
    if z.dim() == 2:
        return z
    return z.mean(dim=tuple(range(2, z.dim())))


def flatten(z: Tensor) -> Tensor:
    """(N, ...) -> (N, prod(...))."""
    if z.dim() < 2:
        raise ValueError(f"flatten expects a batch of shape (N, ...), got shape {tuple(z.shape)}")
    return z.flatten(1)


def embed(mapped: Tensor, eps: float = 1e-12) -> Tensor:
    """L2-normalised embeddings (N, D) of a mapped batch (N, ...); extra dims are flattened.

    A zero row stays zero (its cosine similarity with anything is 0)."""
    if mapped.dim() < 2:
        raise ValueError(
            f"embed expects a batch of shape (N, D) or (N, ...), got shape {tuple(mapped.shape)}"
        )
    return F.normalize(mapped.flatten(1), p=2.0, dim=1, eps=eps)


def get_mapping(name: MappingName, fp_tail: Mapping | None = None) -> Mapping:
    """The mapping ``g`` named by the config. ``fp_tail`` (any callable Tensor -> Tensor, the frozen
    FP rest of the network after the unit) is required for ``"fp_tail"`` and ignored otherwise.
    ``g`` must let gradients flow back to its input (frozen parameters, no ``torch.no_grad``)."""
    if name == "pool":
        return pool
    if name == "flatten":
        return flatten
    if name == "fp_tail":
        if fp_tail is None:
            raise ValueError(
                "mapping 'fp_tail' needs the frozen FP remainder of the network as a callable; "
                "pass fp_tail=..., or choose mapping 'pool' or 'flatten'"
            )
        if not callable(fp_tail):
            raise TypeError(
                f"fp_tail must be callable Tensor -> Tensor, got {type(fp_tail).__name__}"
            )
        return fp_tail
    raise ValueError(f"mapping must be one of {_MAPPINGS}, got {name!r}")


@torch.no_grad()
def build_bank(
    z_f: Tensor | Iterable[Tensor], mapping: Mapping, *, batch_size: int = 256
) -> Tensor:
    """FP embeddings of the whole calibration set, M x D, row k = sample k (no gradient).

    ``z_f`` is either the unit's FP outputs for all M samples (one tensor, mapped in chunks of
    ``batch_size``) or an iterable of such chunks in sample order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = z_f.split(batch_size) if isinstance(z_f, Tensor) else z_f
    rows = [embed(mapping(c)) for c in chunks]
    if not rows:
        raise ValueError("build_bank got no FP outputs; the bank needs the whole calibration set")
    return torch.cat(rows)


# --------------------------------------------------------------------------- negatives


def _negative_mask(
    anchor_ids: Tensor,
    key_ids: Tensor,
    num_negatives: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Bool (N, P): which keys are negatives of each anchor. A key is eligible when it is another
    sample (key_id != anchor_id); with ``num_negatives`` a uniform random subset of that many
    eligible keys is kept per anchor (all eligible ones when fewer exist)."""
    eligible = key_ids.unsqueeze(0) != anchor_ids.unsqueeze(1)
    n, p = eligible.shape
    if num_negatives is None or num_negatives >= p:
        return eligible
    gen_device = generator.device if generator is not None else eligible.device
    scores = torch.rand((n, p), generator=generator, device=gen_device).to(eligible.device)
    scores = scores.masked_fill(~eligible, -1.0)  # rand is in [0, 1): ineligible ranks last
    top = scores.topk(num_negatives, dim=1).indices
    chosen = torch.zeros_like(eligible).scatter_(1, top, True)
    return chosen & eligible


# --------------------------------------------------------------------------- critics


def _parts_one_direction(
    anchors: Tensor,
    positives: Tensor,
    keys: Tensor,
    neg_mask: Tensor,
    *,
    tau: float,
    critic: Critic,
    calib_size: int,
    self_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """The loss of one direction as ``pos + neg - const`` (each a scalar, mean over anchors;
    relational also returns ``kl``, the same value computed without the cancellation):

    * nce: pos = -log h(i,i), neg = -sum_j log(1 - h(i,j)), const 0;
    * infonce: pos = -s_ii / tau, neg = logsumexp over [s_ii, s_ij...] / tau, const 0;
    * relational: pos = -sum_j p_f_ij s^q_ij / tau (attraction to the FP profile), neg =
      logsumexp_j s^q_ij / tau (repulsion), const = entropy of p_f_i (no gradient to e_q).

    ``self_mask`` (N, P): keys that are the anchor's own sample (relational only: the
    negatives plus these are its keys; without it, the negatives alone). In the symmetric
    form's second direction (anchors e_f, keys e_q) the relational target is built from e_q,
    so it is not a constant there."""
    if critic == "relational":
        keep = neg_mask if self_mask is None else (neg_mask | self_mask)
        t_logits = (positives @ keys.T / tau).masked_fill(~keep, float("-inf"))
        q_logits = (anchors @ keys.T / tau).masked_fill(~keep, float("-inf"))
        p_f = torch.softmax(t_logits, dim=1)
        log_p_f = torch.log_softmax(t_logits, dim=1)
        zero = torch.zeros_like(p_f)
        q_clean = torch.where(keep, q_logits, zero)
        attract = -torch.where(keep, p_f * q_clean, zero).sum(dim=1)
        repel = torch.logsumexp(q_logits, dim=1)
        entropy = -torch.where(keep, p_f * log_p_f, zero).sum(dim=1)
        # the KL itself, computed directly: exactly 0 at e_q = e_f (pos + neg - const cancels
        # only to rounding, and can come out slightly negative in float32)
        kl = torch.where(keep, p_f * (log_p_f - torch.log_softmax(q_logits, dim=1)), zero).sum(dim=1)
        return {"pos": attract.mean(), "neg": repel.mean(), "const": entropy.mean(), "kl": kl.mean()}
    pos = (anchors * positives).sum(dim=1) / tau  # (N,)
    logits = anchors @ keys.T / tau  # (N, P)
    if critic == "infonce":
        neg = logits.masked_fill(~neg_mask, float("-inf"))
        full = torch.cat([pos.unsqueeze(1), neg], dim=1)
        return {"pos": -pos.mean(), "neg": torch.logsumexp(full, dim=1).mean()}
    # nce: log(N/M) per anchor, N = negatives this anchor got (>= 1 to keep the log finite)
    n_neg = neg_mask.sum(dim=1).clamp_min(1).to(pos.dtype)
    log_ratio = torch.log(n_neg) - math.log(calib_size)
    log_h_pos = F.logsigmoid(pos - log_ratio)
    log_1m_h = F.logsigmoid(-(logits - log_ratio.unsqueeze(1)))
    neg_sum = torch.where(neg_mask, log_1m_h, torch.zeros_like(log_1m_h)).sum(dim=1)
    return {"pos": -log_h_pos.mean(), "neg": -neg_sum.mean()}


def contrastive_loss(e_q: Tensor, e_f: Tensor, **kw) -> Tensor:
    """L_CL for one batch (scalar tensor; unweighted: the caller multiplies by lambda).
    Arguments as ``contrastive_parts``, whose ``"loss"`` this is."""
    return contrastive_parts(e_q, e_f, **kw)["loss"]


def contrastive_parts(
    e_q: Tensor,
    e_f: Tensor,
    *,
    tau: float,
    critic: Critic,
    bank: Tensor | None = None,
    bank_index: Tensor | None = None,
    num_negatives: int | None = None,
    calib_size: int,
    symmetric: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """L_CL for one batch and its parts: ``{"loss", "pos", "neg"}`` (+ ``"const"`` for
    ``relational``), ``loss = pos + neg - const`` (see ``_parts_one_direction``), scalars,
    ``loss >= 0``; unweighted (the caller multiplies by lambda).

    e_q, e_f: N x D L2-normalised embeddings (``embed``) of the quantized and FP outputs of the same
        N samples; row i of both is sample i. Gradients flow through e_q (and e_f if it has any).
    tau: critic temperature (> 0).
    critic: ``"nce"``, ``"infonce"`` or ``"relational"`` (see the module docstring). With
        ``relational`` the keys of an anchor are its negatives plus its own sample's key(s).
    bank: optional M x D FP embeddings of the whole calibration set; when given, negatives come
        from the bank instead of the batch. The bank is used as a constant (no gradient).
    bank_index: (N,) integer ids of the batch's samples = their rows in the bank. Required with a
        bank. Without a bank it is optional and, when given, marks batch rows that are the same
        sample (drawn twice) so they are not negatives of each other.
    num_negatives: negatives per anchor, drawn uniformly without replacement from the eligible ones
        (seeded by ``generator``); None or >= eligible count: all of them.
    calib_size: M of the nce critic, the number of calibration samples (the bank's row count when a
        bank is used). N of the critic is the number of negatives each anchor actually got.
    symmetric: also compute the loss with roles swapped (anchors e_f, positives e_q, negatives the
        other rows of the quantized batch e_q) and return the mean of the two directions.
    generator: RNG for negative sampling; its device may differ from the tensors'.
    """
    if critic not in _CRITICS:
        raise ValueError(f"critic must be one of {_CRITICS}, got {critic!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if calib_size < 1:
        raise ValueError(f"calib_size must be >= 1 (the calibration-set size M), got {calib_size}")
    if num_negatives is not None and num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1 or None (all), got {num_negatives}")
    if e_q.dim() != 2 or e_q.shape != e_f.shape:
        raise ValueError(
            f"e_q and e_f must both be N x D with the same shape, got {tuple(e_q.shape)} and "
            f"{tuple(e_f.shape)}; map and embed z_q and z_f with the same mapping"
        )
    n = e_q.shape[0]
    device = e_q.device
    dtype = torch.promote_types(e_q.dtype, torch.float32)
    e_q = e_q.to(dtype)
    e_f = e_f.to(device=device, dtype=dtype)

    batch_ids = torch.arange(n, device=device)
    if bank_index is not None:
        if bank_index.dim() != 1 or bank_index.shape[0] != n:
            raise ValueError(
                f"bank_index must hold one bank row per batch sample, shape ({n},), got "
                f"{tuple(bank_index.shape)}"
            )
        if bank_index.dtype.is_floating_point or bank_index.dtype == torch.bool:
            raise ValueError(f"bank_index must be an integer tensor, got {bank_index.dtype}")
        batch_ids = bank_index.to(device=device, dtype=torch.long)

    if bank is not None:
        if bank_index is None:
            raise ValueError(
                "negatives from a bank need bank_index, the batch samples' rows in the bank, so "
                "that each anchor's own sample is excluded"
            )
        if bank.dim() != 2 or bank.shape[1] != e_q.shape[1]:
            raise ValueError(
                f"bank must be M x D with D = {e_q.shape[1]} (the embedding size), got "
                f"{tuple(bank.shape)}"
            )
        keys = bank.detach().to(device=device, dtype=dtype)
        key_ids = torch.arange(keys.shape[0], device=device)
    else:
        if n < 2:
            raise ValueError(
                "batch negatives need a batch of at least 2 samples, got 1; use a bank or a "
                "larger batch"
            )
        keys = e_f
        key_ids = batch_ids

    kw = {"tau": tau, "critic": critic, "calib_size": calib_size}
    mask = _negative_mask(batch_ids, key_ids, num_negatives, generator)
    own = key_ids.unsqueeze(0) == batch_ids.unsqueeze(1)
    parts = _parts_one_direction(e_q, e_f, keys, mask, self_mask=own, **kw)
    if symmetric:
        if n < 2:
            raise ValueError(
                "the symmetric form takes negatives from the quantized batch: it needs N >= 2"
            )
        mask_q = _negative_mask(batch_ids, batch_ids, num_negatives, generator)
        own_q = batch_ids.unsqueeze(0) == batch_ids.unsqueeze(1)
        other = _parts_one_direction(e_f, e_q, e_q, mask_q, self_mask=own_q, **kw)
        parts = {k: 0.5 * (parts[k] + other[k]) for k in parts}
    if "kl" in parts:
        loss = parts.pop("kl")
    else:
        loss = parts["pos"] + parts["neg"]
    return {**parts, "loss": loss}


# --------------------------------------------------------------------------- from the config


@dataclass(frozen=True)
class ContrastiveLoss:
    """The critic and negatives of ``cfg.cl_calib``, built once per unit with
    ``ContrastiveLoss.from_config(cfg.cl_calib, calib_size=...)`` and called per iteration.
    ``__call__`` returns the unweighted L_CL (the unit's terms multiply it by lambda)."""

    tau: float
    critic: Critic
    use_bank: bool
    num_negatives: int | None
    symmetric: bool
    calib_size: int

    @classmethod
    def from_config(cls, cfg: ClCalib, *, calib_size: int) -> ContrastiveLoss:
        """``calib_size``: the number of calibration samples actually used (the bank's rows)."""
        if calib_size < 1:
            raise ValueError(f"calib_size must be >= 1, got {calib_size}")
        return cls(
            tau=cfg.tau,
            critic=cfg.critic,
            use_bank=cfg.negatives == "bank",
            num_negatives=cfg.num_negatives,
            symmetric=cfg.symmetric,
            calib_size=calib_size,
        )

    def __call__(
        self,
        e_q: Tensor,
        e_f: Tensor,
        *,
        bank: Tensor | None = None,
        bank_index: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if self.use_bank and bank is None:
            raise ValueError(
                "cl_calib.negatives is 'bank' but no bank was given; build it once per unit with "
                "build_bank(...) and pass bank= and bank_index="
            )
        return contrastive_loss(
            e_q,
            e_f,
            tau=self.tau,
            critic=self.critic,
            bank=bank if self.use_bank else None,
            bank_index=bank_index,
            num_negatives=self.num_negatives,
            calib_size=self.calib_size,
            symmetric=self.symmetric,
            generator=generator,
        )
