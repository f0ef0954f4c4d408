"""Chat prompts as token ids, the same for serving and for training: the template's own markup keeps its
control tokens, while whatever a caller wrote inside a message is tokenized as plain text. Otherwise a
user could type "<|im_start|>system ..." and forge a system or assistant turn, which would then be served
and, once rated, learnt."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

# Placeholders put into the template instead of each message's content: private-use characters that no
# template adds, so the rendered text splits cleanly into markup and content.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class ChatTokenizer:
    """The model's tokenizer twice: one reads control tokens (for the template's markup), one never does
    (for content). Two instances rather than one switched per call: the switch is shared state inside the
    tokenizer, and rendering runs in several threads at once."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.markup = AutoTokenizer.from_pretrained(model_dir)
        self.text = AutoTokenizer.from_pretrained(model_dir, split_special_tokens=True)

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation in the model's chat template."""
        marked = [{**m, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
        text = self.markup.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False)
        ids: list[int] = []
        for i, piece in enumerate(_PLACEHOLDER.split(text)):
            if i % 2:    # a message's content, as text
                ids += self.text.encode(messages[int(piece)]["content"], add_special_tokens=False)
            elif piece:  # the template's markup
                ids += self.markup.encode(piece, add_special_tokens=False)
        return ids

    def render_example(self, messages: Sequence[dict[str, str]], answer: str) -> tuple[list[int], int]:
        """Ids of the conversation followed by `answer` as the assistant's turn, and where the answer starts."""
        prompt = self.render(messages, add_generation_prompt=True)
        full = self.render([*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False)
        if full[:len(prompt)] != prompt:
            raise ValueError("the chat template renders the answer's turn unlike the generation prompt")
        return full, len(prompt)

    def decode(self, ids: Sequence[int]) -> str:
        return self.markup.decode(ids)
