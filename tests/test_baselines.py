"""The random and pooling baselines as pure functions, their plans, checked against values built by hand."""

import hashlib
import math

import pytest
import torch
from layouts import tokens_of
from omegaconf import OmegaConf

from dycoke_eval.config import ConfigError, compose_option
from dycoke_eval.methods.pooling import Pooling, pooled_side
from dycoke_eval.methods.random_tokens import RandomTokens
from dycoke_eval.plans import plan_row


def literal_seed(seed: int, sample: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample}".encode()).digest()[:8], "little")


def test_random_keeps_a_seeded_uniform_draw_of_round_ratio_times_the_tokens_in_video_order():
    tokens = tokens_of(torch.randn(8, 16, 4), 4, 4)
    out = RandomTokens(ratio=0.3, seed=5).select(tokens, {}, "videomme/7")
    expected = torch.randperm(128, generator=torch.Generator().manual_seed(literal_seed(5, "videomme/7")))[:38]
    assert out.index.tolist() == sorted(expected.tolist())  # round(128 * 0.3) = 38.4 -> 38
    assert torch.equal(out.features, tokens.features[out.index])
    other = RandomTokens(ratio=0.3, seed=5).select(tokens, {}, "videomme/8")
    assert not torch.equal(out.index, other.index)


def test_random_keeps_at_least_one_token_and_refuses_ratios_outside_zero_one():
    assert len(RandomTokens(ratio=0.001).select(tokens_of(torch.randn(1, 16, 4), 4, 4), {}, "").index) == 1
    for ratio in (0.0, 1.5):
        with pytest.raises(ConfigError, match=f"ratio={ratio}"):
            RandomTokens(ratio=ratio)


def test_pooling_a_4x4_grid_to_a_quarter_averages_each_2x2_block():
    grid = torch.randn(2, 16, 3)
    out = Pooling(ratio=0.25).select(tokens_of(grid, 4, 4), {}, "")
    expected, index = [], []
    for frame in range(2):
        for top in (0, 2):
            for left in (0, 2):
                block = [grid[frame, (top + r) * 4 + left + c] for r in range(2) for c in range(2)]
                expected.append(torch.stack(block).mean(dim=0))
                index.append(frame * 16 + top * 4 + left)
    torch.testing.assert_close(out.features, torch.stack(expected))
    assert out.index.tolist() == index


def test_pooling_a_14x14_grid_at_half_uses_adaptive_windows_of_uneven_size():
    grid = torch.randn(1, 196, 2)
    out = Pooling(ratio=0.5).select(tokens_of(grid, 14, 14), {}, "")
    side = round(14 * math.sqrt(0.5))  # 9.9 -> 10
    assert side == pooled_side(14, 0.5) and out.features.shape == (side * side, 2)
    image = grid[0].view(14, 14, 2)
    for i in range(side):
        for j in range(side):
            rows = range(i * 14 // side, math.ceil((i + 1) * 14 / side))
            cols = range(j * 14 // side, math.ceil((j + 1) * 14 / side))
            window = torch.stack([image[r, c] for r in rows for c in cols]).mean(dim=0)
            torch.testing.assert_close(out.features[i * side + j], window)


def eq8_tflops(tokens: float, hidden: int, ffn: int, layers: int, decoded: int = 100) -> float:
    """Eq. 8 of the DyCoke supplementary, written out: every layer sees `tokens` in prefill and decoding."""
    prefill = 4 * tokens * hidden**2 + 2 * tokens**2 * hidden + 2 * tokens * hidden * ffn
    decode = decoded * ((4 * hidden**2 + 2 * hidden * ffn) + 2 * (hidden * tokens + hidden * (decoded + 1) / 2))
    return layers * (prefill + decode) / 1e12


@pytest.mark.parametrize("method, tokens", [("random", round(32 * 196 * 0.25)), ("pooling", 32 * 7 * 7)])
def test_the_plan_counts_the_baselines_tokens_at_7b(method, tokens):
    cfg = OmegaConf.create(
        {
            "model": OmegaConf.to_container(compose_option("model", "llava_ov_7b")),
            "method": OmegaConf.to_container(compose_option("method", method)),
            "frames": 32,
        }
    )
    row = plan_row(cfg)
    assert row["tflops"] == pytest.approx(eq8_tflops(tokens, 3584, 18944, 28))
    assert row["flops_ratio"] == pytest.approx(eq8_tflops(tokens, 3584, 18944, 28) / eq8_tflops(32 * 196, 3584, 18944, 28))
    assert row["retained_ratio"] == pytest.approx(tokens / (32 * 196))
