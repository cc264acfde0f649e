"""Groups of different sizes (frames, segments, token groups) laid out as one padded batch, so a video's groups
cost one set of kernels: the valid part of each row, and a row's chosen entries moved to its front."""

from __future__ import annotations

import torch


def below(width: int, counts: list[int] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """[len(counts), width] True where the column is below the row's count: the valid part of padded rows."""
    counts = counts if isinstance(counts, torch.Tensor) else torch.tensor(counts, device=device)
    return torch.arange(width, device=device) < counts[:, None]


def laid_out(values: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """[G, width] rows of one flat `values`: row g reads it from `starts[g]` on, past its own length whatever follows
    (padding, which the rows' valid masks never read). One draw of noise serves many groups this way."""
    at = starts[:, None] + torch.arange(width, device=starts.device)
    return values[at.clamp(max=values.numel() - 1)]


def true_first(mask: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Indices along the last dim: each row's True entries in ascending order, then its False ones (a stable sort),
    cut to the first `width`."""
    order = mask.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)
    return order if width is None else order[..., :width]
