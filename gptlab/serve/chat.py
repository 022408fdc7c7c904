"""The chat template: ChatML rendered as plain text.

A conversation becomes one prompt string, each message framed by ChatML markers (the format of
OpenAI's ChatML and of most open chat fine-tunes), ending with an open assistant turn:

    <|im_start|>system
    You are terse.<|im_end|>
    <|im_start|>user
    Hi!<|im_end|>
    <|im_start|>assistant
    <generation goes here>

Every message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; a message's optional `name` is
appended to the role after a space (`<|im_start|>user alice`) and must match OpenAI's rule for names,
`NAME_PATTERN` (so it cannot carry markers or newlines into the template), and `developer` messages are rendered
as `system`. The markers are ordinary text, tokenized with the model's own BPE (they are not special
tokens, so a GPT-2 vocabulary needs no new ids). The reply stops at the first `<|im_end|>` (or the
end-of-text token), which is not returned.

A model answers well only if it was fine-tuned on conversations rendered this way; fine-tune with
`render_chat(messages, add_generation_prompt=False)` to produce training text in the same format.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
STOP = [IM_END]
"""Stop sequences every chat request gets (in addition to its own `stop`)."""
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
"""A message's `name`, as OpenAI's API defines it."""


def render_chat(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """The ChatML text of `messages` (dicts with `role`, `content` and optional `name`)."""
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content") or ""
        if not isinstance(role, str) or not role or any(c.isspace() for c in role):
            raise ValueError(f"message {i} has role {role!r}; expected system, user or assistant")
        if not isinstance(content, str):
            raise ValueError(f"message {i} has content of type {type(content).__name__}; expected a string")
        if role == "developer":
            role = "system"
        name = m.get("name")
        if name is not None and (not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name)):
            raise ValueError(f"message {i} has name {name!r}; a name is 1-64 letters, digits, '_' or '-'")
        header = f"{role} {name}" if name else role
        out.append(f"{IM_START}{header}\n{content}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)
