"""The two prompt forms a run can use, and how an answer is read back.

`paper`: the conversation the papers' runs used, LLaVA-NeXT's `qwen_1_5` template (ChatML with a
system turn; docs/protocol.md#prompt), with the video placeholder before the question. `checkpoint`: the
checkpoint's own chat template (llava-hf's renders no system turn and other whitespace). Different
tokens give different numbers, so a run records which form it used.
"""

from __future__ import annotations

PROMPT_FORMS = ("paper", "checkpoint")
SYSTEM_MESSAGE = "You are a helpful assistant."
TURN_END = "<|im_end|>"


def qwen_1_5_prompt(question: str, video_placeholder: str) -> str:
    """LLaVA-NeXT's `qwen_1_5` conversation: system turn, user turn (video, newline, question), assistant header."""
    turns = [("system", SYSTEM_MESSAGE), ("user", f"{video_placeholder}\n{question}")]
    rendered = "".join(f"<|im_start|>{role}\n{message}{TURN_END}\n" for role, message in turns)
    return rendered + "<|im_start|>assistant\n"


def render_prompt(form: str, question: str, processor) -> str:
    """The prompt text for one video and one question, with a single video placeholder."""
    if form == "paper":
        return qwen_1_5_prompt(question, processor.video_token)
    if form == "checkpoint":
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    raise ValueError(f"prompt={form!r}; use one of {', '.join(PROMPT_FORMS)}")


def read_answer(text: str, until: str | list[str] | None) -> str:
    """As the paper's model class: cut at the end of the turn and strip; then the task's own stop strings."""
    text = text.split(TURN_END, 1)[0].strip()
    for stop in [until] if isinstance(until, str) else list(until or []):
        if stop:
            text = text.split(stop, 1)[0]
    return text
