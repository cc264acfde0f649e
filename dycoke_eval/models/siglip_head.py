"""SigLIP's attention-pooling head, re-attached to a LLaVA tower that dropped it (FastVID's "vision abstract").

The llava-hf towers keep 26 of SigLIP-so400m's 27 layers and no head. FastVID loads the original
SigLIP checkpoint's `post_layernorm` and `head` (`siglip_encoder.py:622-655`, called in
`llava_arch.py:221-225`) and applies them to the unpooled states of the tower's last kept layer,
before any post-layernorm (HF `hidden_states[-1]`):

    x = LN_post(h);  (o, A) = MHA(probe, x, x), A averaged over heads;  G = o + MLP(LN_head(o))

Only those tensors are read from the checkpoint (15,238,352 head parameters plus 2,304 of the
layernorm for so400m); the model setting `siglip_head` names it (hub id or local folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dycoke_eval.config import ConfigError

KEY_PREFIXES = ("vision_model.post_layernorm.", "vision_model.head.")  # the checkpoint's keys that FastVID loads
FOLDER = "a folder holding a SigLIP checkpoint's config.json and *.safetensors"
FIX = f"set model.siglip_head to a SigLIP checkpoint (hub id, e.g. google/siglip-so400m-patch14-384, or {FOLDER})"


class SiglipPoolingHead(torch.nn.Module):
    """SigLIP's `post_layernorm` and attention-pooling `head`, applied to a tower's unpooled last-layer states."""

    def __init__(self, post_layernorm: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.post_layernorm = post_layernorm
        self.head = head

    @classmethod
    def build(cls, vision_config: Any) -> SiglipPoolingHead:
        """Fresh (randomly initialised) layers at a SiglipVisionConfig's dimensions."""
        from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

        layernorm = torch.nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        return cls(layernorm, SiglipMultiheadAttentionPoolingHead(vision_config))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[F, P, C] states -> the probe's head-mean attention over the P tokens [F, P] and the pooled feature G [F, C].

        HF's head forward drops the attention weights, so its attention is called here directly.
        """
        x = self.post_layernorm(hidden)
        head = self.head
        pooled, attention = head.attention(head.probe.expand(x.shape[0], -1, -1), x, x, need_weights=True)
        pooled = pooled + head.mlp(head.layernorm(pooled))
        return attention[:, 0], pooled[:, 0]


def load_siglip_head(source: str, hidden_size: int, device: torch.device | str, dtype: torch.dtype) -> SiglipPoolingHead:
    """The pooling head of the SigLIP checkpoint `source` (hub id or folder), reading only its own tensors.

    A ConfigError names `model.siglip_head` and the fix when the checkpoint cannot be read, has no
    head, or its width differs from the vision tower's (`hidden_size`).
    """
    config_file, weight_files = _checkpoint_files(source)
    vision_config = _vision_config(json.loads(Path(config_file).read_text()))
    state = _head_tensors(weight_files)
    expected = SiglipPoolingHead.build(vision_config).state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConfigError(
            f"model.siglip_head={source!r} has no pooling head (missing vision_model.{missing[0]}, ...); {FIX}, not a LLaVA tower"
        )
    if vision_config.hidden_size != hidden_size:
        raise ConfigError(
            f"model.siglip_head={source!r} has hidden size {vision_config.hidden_size}, the model's vision tower "
            f"{hidden_size}; use the SigLIP checkpoint the tower was trained from"
        )
    with torch.device("meta"):
        head = SiglipPoolingHead.build(vision_config)
    head.load_state_dict(state, assign=True)
    return head.to(device=device, dtype=dtype).eval()


def _vision_config(raw: dict[str, Any]):
    """The vision settings of a SiglipConfig (a whole SigLIP checkpoint) or of a SiglipVisionConfig."""
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

    return SiglipVisionConfig.from_dict(raw.get("vision_config", raw))


def _head_tensors(weight_files: list[str]) -> dict[str, torch.Tensor]:
    """The head's tensors, keyed as `SiglipPoolingHead` names them; no other tensor of the files is read."""
    from safetensors import safe_open

    state = {}
    for path in weight_files:
        with safe_open(path, framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118  safe_open is not a mapping
                if key.startswith(KEY_PREFIXES):
                    state[key.removeprefix("vision_model.")] = weights.get_tensor(key)
    return state


def _checkpoint_files(source: str) -> tuple[str, list[str]]:
    """(config.json, the *.safetensors files holding the head) of a folder or a hub checkpoint (only those are fetched)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        config, weights = folder / "config.json", sorted(str(p) for p in folder.glob("*.safetensors"))
        if not config.is_file() or not weights:
            raise ConfigError(f"model.siglip_head={source!r} is a folder without config.json and *.safetensors; {FIX}")
        index = folder / "model.safetensors.index.json"
        return str(config), [path for path in weights if Path(path).name in _head_shards(index)] if index.is_file() else weights
    if source.startswith(("/", ".", "~")):
        raise ConfigError(f"model.siglip_head={source!r}: no such folder; {FIX}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        config = hf_hub_download(source, "config.json")
        try:
            index = hf_hub_download(source, "model.safetensors.index.json")
        except EntryNotFoundError:  # one file: its tensors are read lazily, but the file is fetched whole (3.5 GB for so400m)
            return config, [hf_hub_download(source, "model.safetensors")]
        return config, [hf_hub_download(source, shard) for shard in sorted(_head_shards(Path(index)))]
    except (OSError, ValueError, HfHubHTTPError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"model.siglip_head={source!r}: the SigLIP checkpoint could not be read ({reason}); download it once "
            f"(`hf download {source} config.json model.safetensors` with network access), or set model.siglip_head to "
            f"{FOLDER}, or to null to run only methods that need no probe signals"
        ) from None


def _head_shards(index: Path) -> set[str]:
    """The shards of a sharded checkpoint that hold the head's tensors."""
    return {shard for key, shard in json.loads(index.read_text())["weight_map"].items() if key.startswith(KEY_PREFIXES)}
