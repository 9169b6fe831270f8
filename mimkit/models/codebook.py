"""Vector quantisation with an EMA codebook, kept healthy across ranks.

The codebook is a buffer, not a parameter: it is moved by exponential moving averages of the encoder
outputs assigned to each code (the "codebook term" of VQ-VAE, done as an online k-means step), so the
optimiser never touches it and ZeRO never partitions it. Only the commitment term gives gradients.

Collapse (most codes never chosen) is the usual failure on small data, so:
- k-means initialisation on the first training batch, run on rank 0 on encoder outputs gathered from
  every rank, then broadcast (the process group exists by then: the engine made it);
- EMA statistics (counts and sums) all-reduced, so every rank holds the same codebook;
- dead codes (EMA count below a threshold) restarted every ``restart_every`` steps from recent
  encoder outputs picked on rank 0 and broadcast;
- usage counts accumulated for logging: fraction of codes used and perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CodebookConfig:
    num_codes: int = 8192
    dim: int = 32
    l2_normalize: bool = False  # BEiT v2: cosine-similarity lookup on the unit sphere
    decay: float = 0.99  # EMA decay of the code statistics
    beta: float = 0.25  # commitment weight (BEiT v2 uses 1.0)
    kmeans_init: bool = True
    kmeans_iters: int = 10
    restart_dead: bool = True
    dead_threshold: float = 1.0  # a code whose EMA count (assignments per step) falls below this is dead
    restart_every: int = 20  # steps between dead-code checks
    gather_per_rank: int = 4096  # encoder outputs each rank contributes to k-means / restarts


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if _world() > 1:
        dist.broadcast(t, src=src)
    return t


def gather_rows(z: torch.Tensor, per_rank: int) -> torch.Tensor:
    """A random subset of ``per_rank`` rows from every rank, concatenated: [world * n, D]."""
    n = min(per_rank, z.shape[0])
    if _world() > 1:  # equal counts on every rank so all_gather lines up
        n_t = torch.tensor([n], device=z.device)
        dist.all_reduce(n_t, op=dist.ReduceOp.MIN)
        n = int(n_t)
    rows = z[torch.randperm(z.shape[0], device=z.device)[:n]].contiguous()
    if _world() == 1:
        return rows
    out = [torch.empty_like(rows) for _ in range(_world())]
    dist.all_gather(out, rows)
    return torch.cat(out)


def kmeans(x: torch.Tensor, k: int, iters: int, cosine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``x`` [M, D]: centroids [k, D] and cluster sizes [k]."""
    idx = torch.randint(0, x.shape[0], (k,), device=x.device) if x.shape[0] < k else torch.randperm(x.shape[0], device=x.device)[:k]
    centroids = x[idx].clone()
    if x.shape[0] < k:  # fewer points than codes: jitter duplicates apart
        centroids += 1e-3 * x.std() * torch.randn_like(centroids)
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = nearest_code(x, centroids)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0  # empty clusters keep their centroid
        centroids[filled] = sums[filled] / counts[filled, None]
        if cosine:
            centroids = F.normalize(centroids, dim=-1)
    return centroids, counts


def nearest_code(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Index of the closest code (squared L2) for each row of ``z`` [M, D] -> [M]."""
    dist2 = z.pow(2).sum(-1, keepdim=True) - 2 * z @ codes.t() + codes.pow(2).sum(-1)[None]
    return dist2.argmin(-1)


def usage_stats(counts: torch.Tensor) -> dict[str, float]:
    """Fraction of codes used at least once, and perplexity exp(H(p)) of the usage distribution."""
    total = counts.sum()
    if total <= 0:
        return {"codebook_usage": 0.0, "codebook_perplexity": 0.0, "codes_used": 0}
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"codebook_usage": used / counts.numel(), "codebook_perplexity": float(entropy.exp()), "codes_used": used}


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with straight-through gradients and an EMA-updated codebook.

    ``forward(z [..., D]) -> (z_q [..., D], ids [...], commit_loss)``; in training mode it also
    initialises, updates and restarts the codebook, and counts usage.
    """

    def __init__(self, cfg: CodebookConfig):
        super().__init__()
        self.cfg = cfg
        K, D = cfg.num_codes, cfg.dim
        embed = torch.randn(K, D)
        if cfg.l2_normalize:
            embed = F.normalize(embed, dim=-1)
        self.register_buffer("embedding", embed)  # [K, D]
        self.register_buffer("ema_count", torch.full((K,), cfg.dead_threshold))  # assignments per step
        self.register_buffer("ema_sum", embed.clone() * cfg.dead_threshold)  # [K, D]
        self.register_buffer("usage_counts", torch.zeros(K))  # since the last reset_usage()
        self.register_buffer("initialized", torch.tensor(not cfg.kmeans_init))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.restarts_total = 0

    @property
    def num_codes(self) -> int:
        return self.cfg.num_codes

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()  # statistics in fp32 whatever the engine's dtype
        return F.normalize(z, dim=-1) if self.cfg.l2_normalize else z

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids for ``z`` [..., D] -> [...] (no state change)."""
        flat = self._prepare(z.reshape(-1, z.shape[-1]))
        return nearest_code(flat, self.embedding.float()).reshape(z.shape[:-1])

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes for ids [...] -> [..., D]."""
        return F.embedding(ids, self.embedding)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = z.shape
        flat = self._prepare(z.reshape(-1, shape[-1]))  # [M, D]
        if self.training and not bool(self.initialized):
            self._kmeans_init(flat.detach())
        ids = nearest_code(flat.detach(), self.embedding.float())  # [M]
        z_q = self.embedding.float()[ids]  # [M, D]
        commit = self.cfg.beta * F.mse_loss(flat, z_q.detach())
        if self.training:
            self._ema_update(flat.detach(), ids)
        z_q = flat + (z_q - flat).detach()  # straight-through estimator
        return z_q.reshape(shape).to(z.dtype), ids.reshape(shape[:-1]), commit

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        sample = gather_rows(flat, self.cfg.gather_per_rank)
        K = self.cfg.num_codes
        centroids = torch.zeros(K, flat.shape[1], device=flat.device)
        counts = torch.zeros(K, device=flat.device)
        if _rank() == 0:
            centroids, counts = kmeans(sample, K, self.cfg.kmeans_iters, self.cfg.l2_normalize)
            counts = counts * flat.shape[0] * _world() / sample.shape[0]  # per-step scale
        broadcast_(centroids)
        broadcast_(counts)
        self.embedding.copy_(centroids)
        self.ema_count.copy_(counts.clamp(min=self.cfg.dead_threshold))  # nothing starts out dead
        self.ema_sum.copy_(centroids * self.ema_count[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        K, decay = self.cfg.num_codes, self.cfg.decay
        counts = torch.bincount(ids, minlength=K).float()  # [K]
        sums = torch.zeros(K, flat.shape[1], device=flat.device).index_add_(0, ids, flat)  # [K, D]
        stats = all_reduce_sum_(torch.cat([counts[:, None], sums], dim=1))  # one collective for both
        counts, sums = stats[:, 0], stats[:, 1:]
        self.usage_counts += counts
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        # Laplace smoothing keeps a code that drifts to zero count from dividing by zero
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + K * 1e-5) * n
        embed = self.ema_sum / smoothed[:, None]
        self.embedding.copy_(F.normalize(embed, dim=-1) if self.cfg.l2_normalize else embed)
        self.steps += 1
        if self.cfg.restart_dead and int(self.steps) % self.cfg.restart_every == 0:
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Move codes whose EMA count fell below the threshold onto recent encoder outputs."""
        sample = gather_rows(flat, self.cfg.gather_per_rank)  # every rank takes part
        dead = self.ema_count < self.cfg.dead_threshold  # same on every rank (stats all-reduced)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        new = torch.zeros(n_dead, flat.shape[1], device=flat.device)
        if _rank() == 0:
            pick = torch.randint(0, sample.shape[0], (n_dead,), device=flat.device)
            new = sample[pick] + 1e-3 * sample.std() * torch.randn_like(new)  # jitter repeats apart
            if self.cfg.l2_normalize:
                new = F.normalize(new, dim=-1)
        broadcast_(new)
        self.embedding[dead] = new
        self.ema_count[dead] = self.cfg.dead_threshold
        self.ema_sum[dead] = new * self.cfg.dead_threshold
        self.restarts_total += n_dead
        return n_dead

    def usage(self) -> dict[str, float]:
        """Usage since the last :meth:`reset_usage` (counts are global: all-reduced every step)."""
        return usage_stats(self.usage_counts)

    def reset_usage(self) -> None:
        self.usage_counts.zero_()
