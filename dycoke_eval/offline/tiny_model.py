"""A tiny, randomly initialised LLaVA-OneVision built from the real HF classes.

It stands in for a hub checkpoint wherever no network is available (tests, the offline default
run). Its token geometry matches the real model's in kind: SigLIP 56 px / patch 8 gives a 7x7
grid per frame, 2x2 bilinear pooling gives 4x4 = 16 tokens per frame, and one `image_newline`
token follows the whole video. It is saved with `save_pretrained`, so the wrapper loads it exactly
like `llava-hf/llava-onevision-qwen2-0.5b-ov-hf`. Beside it, a tiny SigLIP checkpoint in the format
of `google/siglip-so400m-patch14-384` (a whole `SiglipModel`, same key names) gives the pooling
head that FastVID re-attaches, at the tiny tower's width (`build_tiny_siglip_head`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

IMAGE_SIZE = 56
PATCH_SIZE = 8
PATCHES_PER_SIDE = IMAGE_SIZE // PATCH_SIZE
TOKENS_PER_FRAME = math.ceil(PATCHES_PER_SIDE / 2) ** 2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
BUILD_VERSION = 5  # bump when the recipe changes so cached copies are rebuilt
GENERATION_CAP = 16  # new tokens per answer: a random model stops when it happens to emit <|im_end|>
MARKER = "dycoke_tiny.json"  # the build's version and its generation cap, beside the weights
TINY_SIGLIP = {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "hidden_size": 32, "intermediate_size": 64,
               "num_attention_heads": 2}  # fmt: skip

# The chat template of the llava-hf OneVision checkpoints, as transformers' own processor tests
# write it (tests/models/llava_onevision/test_processing_llava_onevision.py): a space after the
# role, media placeholders first, each text after a newline, no newline after `<|im_end|>`.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "The person in the video picks up a cup and walks to the table.",
    "Answer the question using a single word or phrase.",
    "Select the best answer to the following multiple-choice question based on the video.",
    "Respond with only the letter (A, B, C, or D) of the correct option.",
    "Describe the video in detail. What is happening? Who is there? Where is it?",
    "yes no red blue green one two three left right up down before after because",
    "Question: Option: (A) (B) (C) (D) (E) Only give the best option. Best option:",
]


def byte_level_bpe(corpus: list[str], special_tokens: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained offline on `corpus`, as Qwen's are byte-level BPEs (`tokenizers` backend)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus * 4, trainer=trainer)
    return backend


def qwen_tokenizer(backend, image_token: str, video_token: str):
    """transformers' Qwen2 tokenizer around `backend`, ending a turn with <|im_end|> as the real checkpoints do."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={"image_token": image_token, "video_token": video_token},
    )


def build_tokenizer():
    """The offline byte-level BPE tokenizer with the special tokens and chat template the processor needs."""
    tokenizer = qwen_tokenizer(byte_level_bpe(_CORPUS, SPECIAL_TOKENS, 400), "<image>", "<video>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, image_size: int, patch_size: int, image_grid_pinpoints: list | None = None):
    """A LLaVA-OneVision processor for a SigLIP of this input size, around `tokenizer`."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    size = {"height": image_size, "width": image_size}
    grid = {"image_grid_pinpoints": image_grid_pinpoints} if image_grid_pinpoints else {}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, **grid),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )


def llava_onevision_config(tokenizer, vision_config, text_config, **kwargs):
    """LLaVA-OneVision wiring as the llava-hf checkpoints have it: last-layer features, all patches, our token ids."""
    from transformers.models.llava_onevision.configuration_llava_onevision import LlavaOnevisionConfig  # direct: quicker

    return LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        **kwargs,
    )


def tiny_config(tokenizer, vision_use_head: bool = False):
    """The tiny model's LlavaOnevisionConfig: SigLIP 56 px / patch 8, Qwen2 with 8 layers of width 64."""
    from transformers.models.qwen2.configuration_qwen2 import Qwen2Config  # direct imports: plans load no model code
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

    return llava_onevision_config(
        tokenizer,
        vision_config=SiglipVisionConfig(**TINY_SIGLIP, num_hidden_layers=2, vision_use_head=vision_use_head),
        text_config=Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=8,  # room for the paper defaults: DyCoke L=3, FastV K=5
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_grid_pinpoints=PINPOINTS,
        tie_word_embeddings=True,
    )


def build_tiny_checkpoint(path: str | Path, vision_use_head: bool = False) -> Path:
    """Build and save the tiny checkpoint at `path` (a processor and a model), deterministically.

    `vision_use_head=True` keeps SigLIP's attention-pooling head, which the real checkpoints drop.
    """
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    path = Path(path)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, IMAGE_SIZE, PATCH_SIZE, PINPOINTS)
    config = tiny_config(tokenizer, vision_use_head)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / MARKER).write_text(json.dumps({"build_version": BUILD_VERSION, "generation_cap": GENERATION_CAP}))
    return path


def ensure_tiny_checkpoint(path: str | Path) -> Path:
    """Return `path` holding the tiny checkpoint, building it only when absent or stale."""
    return _ensure(Path(path), build_tiny_checkpoint)


def build_tiny_siglip_head(path: str | Path) -> Path:
    """Save a tiny SigLIP checkpoint (`SiglipModel`, text tower included) at `path`, deterministically.

    Its vision width and heads are the tiny tower's; the pooling head and post-layernorm are
    perturbed from their initial values (layernorms start at exactly 1 and 0), so that a test can
    tell this checkpoint's layers from the tiny tower's own.
    """
    import torch
    from transformers import SiglipConfig, SiglipModel

    path = Path(path)
    text = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    config = SiglipConfig(text_config=text, vision_config={**TINY_SIGLIP, "num_hidden_layers": 1})
    torch.manual_seed(0)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.vision_model.named_parameters():
            if name.startswith(("post_layernorm.", "head.")):
                parameter.add_(0.2 * torch.randn_like(parameter))
    path.mkdir(parents=True, exist_ok=True)
    with transformers_errors_only():  # saving compares with a default SiglipConfig, whose text token ids warn
        model.save_pretrained(path)
    (path / MARKER).write_text(json.dumps({"build_version": BUILD_VERSION}))
    return path


@contextmanager
def transformers_errors_only() -> Iterator[None]:
    """transformers logs errors only inside the block; its verbosity is restored after."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def ensure_tiny_siglip_head(path: str | Path) -> Path:
    """Return `path` holding the tiny SigLIP checkpoint, building it only when absent or stale."""
    return _ensure(Path(path), build_tiny_siglip_head)


def _ensure(path: Path, build) -> Path:
    marker = path / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("build_version") == BUILD_VERSION:
        return path
    return build(path)


def checkpoint_generation_cap(pretrained: str) -> int | None:
    """The cap a tiny checkpoint carries in its marker (None for any other checkpoint), so every path applies it."""
    marker = Path(pretrained) / MARKER
    return json.loads(marker.read_text()).get("generation_cap") if marker.is_file() else None
