"""SCAN's way of scoring captions against images, written from the formula (benchmarks only).

For each caption, over shards of 128 images: expand the caption, attend (materialising the
attended context vectors), cosine, aggregate. t2i attention, clipped_l2norm, LogSumExp, as in
SCAN's best single model. heiindex never uses this; the benchmarks time it as the baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


@torch.no_grad()
def reference_t2i(
    words: list[torch.Tensor] | torch.Tensor,
    lengths: torch.Tensor,
    regions: torch.Tensor,
    lambda_softmax: float = 9.0,
    lambda_lse: float = 6.0,
    shard: int = 128,
) -> torch.Tensor:
    """Scores (n_caps, n_imgs). ``words[i]`` holds caption i's words (at least ``lengths[i]``)."""
    n_caps, n_imgs = len(lengths), regions.shape[0]
    out = torch.empty(n_caps, n_imgs, dtype=regions.dtype, device=regions.device)
    for s in range(0, n_imgs, shard):
        ims = regions[s : s + shard]
        b = ims.shape[0]
        for i in range(n_caps):
            cap = words[i][: int(lengths[i])].unsqueeze(0).repeat(b, 1, 1)  # (b, L, d)
            attn = torch.bmm(ims, cap.transpose(1, 2))  # (b, R, L)
            attn = l2norm(F.leaky_relu(attn, 0.1), 2)
            attn = torch.softmax(attn.transpose(1, 2) * lambda_softmax, dim=2)  # (b, L, R)
            context = torch.bmm(attn, ims)  # (b, L, d)
            rel = F.cosine_similarity(cap, context, dim=2)
            out[i, s : s + b] = torch.logsumexp(rel * lambda_lse, dim=1) / lambda_lse
    return out
