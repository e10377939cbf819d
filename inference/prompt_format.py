"""BiMediX2's prompt format: Llama-3 chat with LLaVA's image placeholder first in the user turn.

Rendered string (one image)::

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n{question}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

(without the line breaks shown here). This is what SGLang renders with ``--chat-template
llava_llama_3`` when the image part precedes the text part and the system message is sent
explicitly, and what the chat template written into prepared checkpoints renders. The processor
then expands each ``<image>`` into one token per CLIP patch (576 at 336 px / patch 14).
"""

from __future__ import annotations

from collections.abc import Sequence

from .types import Message

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
END_OF_TEXT = "<|end_of_text|>"
HEADER_START = "<|start_header_id|>"
HEADER_END = "<|end_header_id|>"
IMAGE_TOKEN = "<image>"  # noqa: S105 - the LLaVA image placeholder, not a secret

BIMEDIX2_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# The same format as a Jinja chat template (written into prepared and tiny checkpoints), accepting
# string contents and OpenAI-style content lists; image parts render as "<image>\n".
LLAMA3_LLAVA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] in ['image', 'image_url'] %}{{- '<image>\\n' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def message_content(message: Message) -> str:
    """A turn's text with its image placeholders first, as LLaVA places them."""
    return f"{IMAGE_TOKEN}\n" * message.images + message.text


def render_chat(messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
    """The exact prompt string BiMediX2 expects, before image-token expansion."""
    parts = [BOS]
    for message in messages:
        parts.append(f"{HEADER_START}{message.role}{HEADER_END}\n\n{message_content(message)}{EOT}")
    if add_generation_prompt:
        parts.append(f"{HEADER_START}assistant{HEADER_END}\n\n")
    return "".join(parts)


def openai_messages(messages: Sequence[Message], image_urls: Sequence[str]) -> list[dict[str, object]]:
    """The same turns as OpenAI chat messages: image parts before the text part."""
    out: list[dict[str, object]] = []
    urls = iter(image_urls)
    for message in messages:
        if message.images:
            content: list[dict[str, object]] = [
                {"type": "image_url", "image_url": {"url": next(urls)}} for _ in range(message.images)
            ]
            content.append({"type": "text", "text": message.text})
            out.append({"role": message.role, "content": content})
        else:
            out.append({"role": message.role, "content": message.text})
    return out


def parse_openai_messages(raw: Sequence[dict[str, object]]) -> tuple[list[Message], list[str]]:
    """OpenAI chat messages back to :class:`Message`s and their image URLs (in order).

    Image parts anywhere in a turn are placed first, as BiMediX2 was trained; ValueError for
    shapes this format cannot express.
    """
    messages: list[Message] = []
    urls: list[str] = []
    for item in raw:
        role = item.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unsupported message role {role!r}")
        content = item.get("content")
        if isinstance(content, str):
            messages.append(Message(role, content))
            continue
        if not isinstance(content, list):
            raise ValueError("message content must be a string or a list of parts")
        texts: list[str] = []
        images = 0
        for part in content:
            if not isinstance(part, dict):
                raise ValueError("content parts must be objects")
            if part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str):
                    raise ValueError("image_url part without a url")
                urls.append(url)
                images += 1
            else:
                raise ValueError(f"unsupported content part type {part.get('type')!r}")
        messages.append(Message(role, "".join(texts), images))
    return messages, urls
