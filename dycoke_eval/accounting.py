"""FLOPs by the DyCoke supplementary's eq. 8, counted over the visual tokens (as Table 1 does), the model's real
prefill count beside it. Plans of run cells are built from these in `plans.py`.

Per layer with n tokens, hidden d and FFN width m: prefill 4nd^2 + 2n^2d + 2ndm; decoding R
tokens: R((4d^2 + 2dm) + 2(dn + d(R+1)/2)). A method is described by the number of visual
tokens each layer sees during prefill and during decoding.

Eq. 8 is the papers' column, and its ratio overstates what any implementation can reach: it counts
full multi-head K/V, two FFN matrices, a full n^2 attention and no text. `real_prefill_flops` counts the
prefill as the configured model computes it (grouped K/V heads, SwiGLU's three matrices, causal attention,
the prompt's text tokens), in eq. 8's unit (a multiply-add counts once), so the two compare directly.
"""

from __future__ import annotations

from collections.abc import Sequence

from dycoke_eval.geometry import LanguageModelDims, PlannedCounts

DECODED_TOKENS = 100  # R in eq. 8
PLAN_TEXT_TOKENS = 100  # prompt text beside the video in a plan: the paper form's template, a question and its options


def prefill_flops(n: float, dims: LanguageModelDims) -> float:
    d, m = dims.hidden, dims.ffn
    return 4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m


def decode_flops(n: float, dims: LanguageModelDims, decoded: int = DECODED_TOKENS) -> float:
    d, m = dims.hidden, dims.ffn
    return decoded * ((4 * d**2 + 2 * d * m) + 2 * (d * n + d * (decoded + 1) / 2))


def real_prefill_flops(visual: float, text: float, dims: LanguageModelDims) -> float:
    """One decoder layer's prefill over `visual` + `text` tokens, multiply-adds counted once: the Q and O projections
    at the query width, K and V at the grouped width, causal attention (the i-th token attends to i keys, for the
    scores and for the values) and SwiGLU's gate, up and down matrices. Norms, rotary and softmax are left out."""
    s, d = visual + text, dims.hidden
    projections = s * d * (2 * dims.query_width + 2 * dims.kv_width)
    attention = dims.query_width * s * (s + 1)  # 2 x (s(s+1)/2 query-key pairs x head_dim x heads)
    return projections + attention + 3 * s * d * dims.ffn


def prefill_bounds(prefill: Sequence[float], full: Sequence[float], dims: LanguageModelDims, text: float) -> dict[str, float]:
    """The prefill speed-ups a method's visual token counts per layer allow against full tokens: eq. 8's (the
    papers' unit, visual tokens only) and the real one (`real_prefill_flops`, with `text` prompt tokens), and the
    method's real prefill TFLOPs. No implementation beats the real bound; eq. 8's is higher still. Dimensions
    without head counts (old cells' hand-typed ones) give no real figures (None), not a guessed one."""
    bounds = {"prefill_bound_eq8": sum(prefill_flops(n, dims) for n in full) / sum(prefill_flops(n, dims) for n in prefill)}
    if None in (dims.heads, dims.kv_heads, dims.head_dim):
        return {**bounds, "prefill_tflops_real": None, "prefill_bound_real": None}
    real = sum(real_prefill_flops(n, text, dims) for n in prefill)
    return {
        **bounds,
        "prefill_tflops_real": real / 1e12,
        "prefill_bound_real": sum(real_prefill_flops(n, text, dims) for n in full) / real,
    }


def total_flops(prefill_tokens: Sequence[float], decode_tokens: Sequence[float], dims: LanguageModelDims) -> float:
    """Tokens seen by each layer in prefill and in decoding (one entry per layer)."""
    if len(prefill_tokens) != dims.layers or len(decode_tokens) != dims.layers:
        raise ValueError(f"need one token count per layer ({dims.layers})")
    return sum(prefill_flops(n, dims) for n in prefill_tokens) + sum(decode_flops(n, dims) for n in decode_tokens)


def planned_flops(method, dims: LanguageModelDims, layout) -> tuple[float, float, float, dict[str, float]]:
    """(method's eq. 8 FLOPs, full tokens' FLOPs, the method's planned retained ratio, its prefill bounds) for one
    video layout, with `PLAN_TEXT_TOKENS` of prompt text."""
    full = PlannedCounts.full(layout, dims.layers)
    planned = method.plan(full)
    return (
        total_flops(planned.prefill, planned.decode, dims),
        total_flops(full.prefill, full.decode, dims),
        method.planned_retained_ratio(full),
        prefill_bounds(planned.prefill, full.prefill, dims, PLAN_TEXT_TOKENS),
    )
