"""RDR and MSS losses (METHOD sections 4 and 5).

RDR: the network maps a patch to a latent p; the predicted offset from query to support is
d = r * tanh(p_s - p_q) (`medlsam.medlam.network.relative_offset_mm`, the formula inference
uses), regressed with MSE onto d' = (c_s - c_q) * spacing in mm.

MSS: for points sampled in a crop, the normalized feature vector at each of the three decoder
scales is compared (dot product x temperature, softmax over all voxels) with the augmented copy's
feature map; voxels whose tracked original position lies within `pos_radius` voxels of the point
(scaled by the level's downsampling) are positives, those farther than `neg_radius` negatives.
Loss = -mean log p(positives) - mean log(1 - p(negatives)), averaged over points and scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medlsam.medlam.network import relative_offset_mm


def rdr_target_mm(centre_query_mm: torch.Tensor, centre_support_mm: torch.Tensor) -> torch.Tensor:
    """True offset (mm, z y x) from the query patch centre to the support patch centre."""
    return centre_support_mm - centre_query_mm


def rdr_loss(latent_query, latent_support, target_mm, rdr_range_mm) -> torch.Tensor:
    """MSE (mm^2) between r * tanh(p_s - p_q) and the true offset."""
    return F.mse_loss(relative_offset_mm(latent_query, latent_support, rdr_range_mm), target_mm)


@dataclass
class MSSResult:
    loss: torch.Tensor  # scalar, mean over levels of the per-point loss
    hit_rate: float  # fraction of points whose full-resolution argmax is a positive voxel
    used_points: int  # points with at least one positive voxel at every level


def mss_loss(
    features_ori: list[torch.Tensor],
    features_aug: list[torch.Tensor],
    point_idx: torch.Tensor,
    point_mm: torch.Tensor,
    aug_pos_mm: torch.Tensor,
    aug_valid: torch.Tensor,
    spacing_mm,
    pos_radius_vox: float = 1.0,
    neg_radius_vox: float = 2.0,
    temperature: float = 15.0,
) -> MSSResult:
    """Multi-positive contrastive loss between a crop's points and its augmented copy.

    features_*: per level [N, C, d, h, w] (coarse to full resolution, not normalized);
    point_idx [N, K, 3] full-resolution voxel indices in the original crop; point_mm [N, K, 3];
    aug_pos_mm [N, 3, D, H, W] original positions of the augmented crop's voxels; aug_valid
    [N, 1, D, H, W] (bool or 0/1).
    """
    full = aug_pos_mm.shape[2:]
    spacing = torch.as_tensor(spacing_mm, dtype=aug_pos_mm.dtype, device=aug_pos_mm.device)
    valid_full = aug_valid.to(aug_pos_mm.dtype)
    level_losses = []
    used = None
    hit_rate = 0.0
    for level, (f_ori, f_aug) in enumerate(zip(features_ori, features_aug)):
        factor = full[-1] // f_aug.shape[-1]
        if any(full[i] != f_aug.shape[2 + i] * factor for i in range(3)):
            raise ValueError(f"feature level {level} of shape {tuple(f_aug.shape)} does not tile {tuple(full)}")
        # where each coarse cell of the augmented crop came from, and whether all of it is valid
        pos = F.avg_pool3d(aug_pos_mm, factor) if factor > 1 else aug_pos_mm
        valid = (F.avg_pool3d(valid_full, factor) if factor > 1 else valid_full) > 0.999
        n, c = f_aug.shape[:2]
        keys = F.normalize(f_aug.reshape(n, c, -1), dim=1)  # [N, C, M]
        cell = torch.div(point_idx, factor, rounding_mode="floor")  # [N, K, 3]
        batch = torch.arange(n, device=f_ori.device)[:, None]
        queries = f_ori[batch, :, cell[..., 0], cell[..., 1], cell[..., 2]]  # [N, K, C]
        queries = F.normalize(queries, dim=-1)
        log_p = torch.log_softmax(temperature * torch.bmm(queries, keys), dim=-1)  # [N, K, M]

        offset_vox = (pos.reshape(n, 3, 1, -1) - point_mm.permute(0, 2, 1)[..., None]) / spacing[None, :, None, None]
        distance = offset_vox.norm(dim=1)  # [N, K, M], full-resolution voxels
        valid_flat = valid.reshape(n, 1, -1)
        positive = (distance <= pos_radius_vox * factor) & valid_flat
        negative = (distance > neg_radius_vox * factor) & valid_flat
        n_pos = positive.sum(-1)
        pos_term = -(log_p * positive).sum(-1) / n_pos.clamp(min=1)
        log_not_p = torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))
        neg_term = -(log_not_p * negative).sum(-1) / negative.sum(-1).clamp(min=1)
        level_used = n_pos > 0
        used = level_used if used is None else used & level_used
        level_losses.append((pos_term + neg_term, level_used))
        if level == len(features_aug) - 1:
            best = log_p.argmax(dim=-1, keepdim=True)
            hits = positive.gather(-1, best)[..., 0] & level_used
            hit_rate = float(hits.sum()) / max(int(level_used.sum()), 1)
    weights = used.to(log_p.dtype)
    count = weights.sum().clamp(min=1)
    loss = sum((term * weights).sum() / count for term, _ in level_losses) / len(level_losses)
    return MSSResult(loss=loss, hit_rate=hit_rate, used_points=int(used.sum()))
