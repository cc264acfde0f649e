"""Pre-LLM time of every method with a pre-LLM stage at real size, beside the prefill time each one saves.

For each method the script times its pre-LLM selection (`Compressor.select`, the same call the
evaluation wrapper makes) on random video tokens at LLaVA-OneVision-7B size (32 x 196 x 3584),
LLaVA-Video-7B size (64 x 169 x 3584), Qwen2.5-VL-7B size (16 temporal patches x 299 x 3584) and
Qwen3-VL-8B size (16 x 220 x 4096), with random encoder signals of the real shapes (SigLIP so400m:
1152 wide, 729 patches per frame). A method the model cannot run is listed as refused, with why.
It then measures the prefill of one decoder layer of the model's language model (random weights)
at the full sequence length and at the length the method leaves, and multiplies by its layers:
the saved prefill time is that difference. One layer times 28 is an
estimate of the whole stack (the embedding and LM head are not counted; they do not depend on the
visual tokens); the selection time is measured as is.

Random features and scores make data-dependent counts (PruneVid's clusters, FastVID's segments)
arbitrary; the printed token count is the one this run produced. Only pre-LLM stages are timed and counted: HoliTom
runs without its merge M, FlashVID's layer-20 prune is not in its count, and FrameFusion (inside the LLM only) is not
listed.

    python scripts/bench_prellm.py                       # both sizes, every method (CPU: several minutes)
    python scripts/bench_prellm.py --sizes ov --methods fastvid visionzip
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dycoke_eval.checkpoints import resolve_device, resolve_dtype
from dycoke_eval.compression.dispatcher import Compressor
from dycoke_eval.config import ConfigError, instantiate_method
from dycoke_eval.geometry import VideoLayout
from dycoke_eval.offline.architectures import architecture_config
from dycoke_eval.offline.real_size import SIZES, random_encoded_video, size_model_info

METHODS = {  # label -> (config, overrides); R = 25% where the method has a retention setting
    "dycoke_ttm K=0.9": ("dycoke_ttm", {"method.k": 0.9}),
    "fastvid R=25%": ("fastvid", {"method.retention": 0.25}),
    "visionzip after_pooling R=25%": ("visionzip", {"method.form": "after_pooling", "method.retention": 0.25}),
    "visionzip in_encoder R=25%": ("visionzip", {"method.form": "in_encoder", "method.retention": 0.25}),
    "prunevid": ("prunevid", {}),
    "vidcom2 R=25%": ("vidcom2", {"method.retention": 0.25}),
    "holitom R=25%": ("holitom", {"method.retention": 0.25, "method.in_llm": False}),
    "flashvid R=25%": ("flashvid", {"method.retention_ratio": 0.25}),
    "tome R=25%": ("tome", {"method.retention": 0.25}),
}  # FrameFusion acts only inside the LLM: nothing to time here
PROMPT_TEXT_TOKENS = 40


def median_seconds(function, repeats: int, device: str) -> float:
    """Median wall time of `function()` over `repeats` runs after one warm-up."""
    times = []
    for attempt in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        if attempt:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class OneLayerPrefill:
    """The prefill of one decoder layer of an architecture's language model (random weights) at a given length.

    Qwen2-7B's layer stands in for Qwen2.5-VL-7B's (the same widths; M-RoPE costs what RoPE costs) and Qwen3-8B's
    (query/key norms included) for Qwen3-VL-8B's.
    """

    def __init__(self, architecture: str, device: str, dtype: torch.dtype) -> None:
        text = architecture_config(architecture).text_config
        if text.model_type.startswith("qwen3"):
            from transformers import Qwen3Config
            from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer as Layer
            from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as Rotary

            config = Qwen3Config(**{key: getattr(text, key) for key in WIDTHS + ("head_dim",)})
        else:
            from transformers import Qwen2Config
            from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer as Layer
            from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as Rotary

            config = Qwen2Config(**{key: getattr(text, key) for key in WIDTHS})
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device):
            self.layer = Layer(config, layer_idx=0).to(dtype).eval()
            self.rotary = Rotary(config)
        self.layers, self.hidden, self.device, self.dtype = config.num_hidden_layers, config.hidden_size, device, dtype

    @torch.inference_mode()
    def seconds(self, length: int, repeats: int) -> float:
        hidden = torch.randn(1, length, self.hidden, device=self.device, dtype=self.dtype)
        positions = torch.arange(length, device=self.device)[None]
        embeddings = self.rotary(hidden, positions)
        run = lambda: self.layer(hidden, position_ids=positions, position_embeddings=embeddings)  # noqa: E731
        return median_seconds(run, repeats, self.device)


WIDTHS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def kept_newlines(layout: VideoLayout, tokens) -> int:
    """Newline tokens that stay: LLaVA-OV's one; LLaVA-Video's one per row that keeps a token, or the stage's own
    count per frame (`frame_newlines`: FlashVID's and VidCom2's layouts)."""
    if layout.newlines != "row_end":
        return layout.newline_tokens
    if tokens.frame_newlines is not None:
        return layout.frames * tokens.frame_newlines
    index = tokens.index
    return int(torch.unique(index[index >= 0] // layout.cols).numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=sorted(SIZES))
    parser.add_argument("--methods", nargs="+", help="configs to time (default: all)", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each selection (after a warm-up)")
    parser.add_argument("--layer-repeats", type=int, default=1, help="timed runs of each one-layer prefill")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    chosen = {label: spec for label, spec in METHODS.items() if not args.methods or spec[0] in args.methods}
    print(f"device={device} dtype={dtype} torch_threads={torch.get_num_threads()}")

    row = "{:32s} {:>7} {:>12} {:>14} {:>14}"
    for size in args.sizes:
        architecture = SIZES[size][-1]
        prefill = OneLayerPrefill(architecture, device, dtype)
        encoded = random_encoded_video(size, dtype, device)
        layout, (frames, rows, cols, *_) = encoded.layout, SIZES[size]
        full_length = layout.full_tokens + PROMPT_TEXT_TOKENS
        full_layer = prefill.seconds(full_length, args.layer_repeats)
        full_prefill = full_layer * prefill.layers
        print(f"\n{size}: {frames} x {rows * cols} x {prefill.hidden}, {layout.full_tokens} visual + "
              f"{PROMPT_TEXT_TOKENS} text tokens; prefill of one {architecture} layer {full_layer:.2f} s, "
              f"x{prefill.layers} = {full_prefill:.1f} s")  # fmt: skip
        print(row.format("method", "visual", "pre-LLM ms", "prefill s (est)", "prefill saved s"))
        for label, (name, overrides) in chosen.items():
            method = instantiate_method(name, overrides)
            try:
                method.validate_for(size_model_info(size))
            except ConfigError as error:
                print(f"{label:32s} refused: {error}", flush=True)
                continue
            compressor = Compressor(None, method)
            selected = compressor.select(encoded, "bench")
            select = lambda compressor=compressor, encoded=encoded: compressor.select(encoded, "bench")  # noqa: E731
            seconds = median_seconds(select, args.repeats, device)
            kept = selected.tokens.features.shape[0] + kept_newlines(layout, selected.tokens)
            compressed = prefill.seconds(kept + PROMPT_TEXT_TOKENS, args.layer_repeats) * prefill.layers
            figures = (f"{seconds * 1e3:.1f}", f"{compressed:.1f}", f"{full_prefill - compressed:.1f}")
            print(row.format(label, kept, *figures), flush=True)


if __name__ == "__main__":
    main()
