"""FLOPs by the DyCoke supplementary's eq. 8, counted over the visual tokens (as Table 1 does).

Per layer with n tokens, hidden d and FFN width m: prefill 4nd^2 + 2n^2d + 2ndm; decoding R
tokens: R((4d^2 + 2dm) + 2(dn + d(R+1)/2)). A method is described by the number of visual
tokens each layer sees during prefill and during decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DECODED_TOKENS = 100  # R in eq. 8


@dataclass(frozen=True)
class LanguageModelDims:
    hidden: int  # d
    ffn: int  # m
    layers: int  # T


LLAVA_OV_DIMS = {
    "0.5b": LanguageModelDims(896, 4864, 24),
    "7b": LanguageModelDims(3584, 18944, 28),
    "72b": LanguageModelDims(8192, 29568, 80),
}


def prefill_flops(n: float, dims: LanguageModelDims) -> float:
    d, m = dims.hidden, dims.ffn
    return 4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m


def decode_flops(n: float, dims: LanguageModelDims, decoded: int = DECODED_TOKENS) -> float:
    d, m = dims.hidden, dims.ffn
    return decoded * ((4 * d**2 + 2 * d * m) + 2 * (d * n + d * (decoded + 1) / 2))


def total_flops(prefill_tokens: Sequence[float], decode_tokens: Sequence[float], dims: LanguageModelDims) -> float:
    """Tokens seen by each layer in prefill and in decoding (one entry per layer)."""
    if len(prefill_tokens) != dims.layers or len(decode_tokens) != dims.layers:
        raise ValueError(f"need one token count per layer ({dims.layers})")
    return sum(prefill_flops(n, dims) for n in prefill_tokens) + sum(decode_flops(n, dims) for n in decode_tokens)


def uniform_flops(tokens: float, dims: LanguageModelDims) -> float:
    """Every layer sees `tokens` in prefill and decoding (full, TTM-only DyCoke, PruMerge)."""
    return total_flops([tokens] * dims.layers, [tokens] * dims.layers, dims)


def fastv_flops(tokens: float, layer: int, ratio: float, dims: LanguageModelDims) -> float:
    """Layers before `layer` see all tokens in prefill; the rest, and decoding, see `ratio` of them."""
    prefill = [tokens] * layer + [tokens * ratio] * (dims.layers - layer)
    return total_flops(prefill, [tokens * ratio] * dims.layers, dims)
