"""DyCoke's second stage as a decode stage: dynamic KV-cache pruning (the "DP" of Table 5).

At each decode step the newest token's attention over the visual tokens at the scoring layer
(`l` in the paper, `l - 1` in the released code) decides, through `DynamicSelector`, which `1 - p`
of them layers >= `l` attend to; a similar step reuses the last choice (official: prunes nothing).
Plans leave its savings out (the stage keeps the inherited `plan`), as the paper's Table 1 counts
DyCoke's FLOPs: every layer sees the TTM output.
"""

from __future__ import annotations

from dataclasses import dataclass

from dycoke_eval.compression.stages import DecodeStage, ModelInfo
from dycoke_eval.config import ConfigError
from dycoke_eval.methods.kv_selection import DynamicSelector
from dycoke_eval.methods.ttm import check_dycoke_setting


@dataclass
class DynamicKVPruning(DecodeStage):
    l: int = 3  # first layer whose decode-time attention is pruned  # noqa: E741
    p: float = 0.7  # decode-time pruning rate of the visual tokens
    threshold: float = 0.9  # re-select when the visual attention's cosine to the last step is below this
    mode: str = "paper"  # paper | official
    one_shot: bool = False  # select once at the first decode step (Table 5 "w/o DP")
    offload_pruned: bool = False  # true: pruned entries of the layers above the scoring layer wait on the CPU
    name: str = "dp"

    def __post_init__(self) -> None:
        check_dycoke_setting("p", self.p, self.mode)
        if self.l < 0:
            raise ConfigError(f"l={self.l}: the evaluation layer must be >= 0")

    @property
    def first_layer(self) -> int:
        return self.l

    @property
    def score_layer(self) -> int:
        return self.l if self.mode == "paper" else max(self.l - 1, 0)  # the released code scores at layer L-1

    @property
    def carries_state(self) -> bool:
        return self.mode == "official"  # the released code never resets its previous attention vector

    def check(self, model: ModelInfo) -> None:
        if self.mode == "official" and model.family != "llava_onevision":
            raise ConfigError(
                f"{self.name}: mode=official is the released code's span, which assumes llava_onevision's one newline "
                f"after the video; the {model.family!r} model family lays its video out otherwise: use mode=paper"
            )
        super().check(model)

    def span(self, visual_start: int, visual_length: int) -> tuple[int, int]:
        return pruning_span(visual_start, visual_length, self.mode)

    def new_selector(self) -> DynamicSelector:
        return DynamicSelector(1 - self.p, self.threshold, self.mode, self.one_shot)


def pruning_span(visual_start: int, visual_length: int, mode: str) -> tuple[int, int]:
    """The prompt positions decode-time pruning chooses among; `visual_length` counts the newline token.

    Paper: every visual token. Official: the released code sets the image length to the TTM count
    minus one before the newline is appended, so the span is [start, start + N_ttm - 1): the last
    TTM token is always kept and the newline lies outside.
    """
    if mode == "official":
        return visual_start, visual_start + (visual_length - 1) - 1
    return visual_start, visual_start + visual_length
