"""Chat-template pieces, derived from the tokenizer's own template (never from a per-model table).

A KVzip prompt is ``[prefix | context | "\\n\\n" question | assistant turn]``, where ``prefix`` is the chat template up
to the start of the user's message (the protected prefix) and ``assistant turn`` is everything the template puts
between the end of the user's message and the start of the assistant's answer. Both are found by rendering the
template around a sentinel message. A tokenizer without a chat template gets an empty prefix and a newline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SENTINEL = "KVZIP_SENTINEL_7f3a"


@dataclass(frozen=True)
class ChatPieces:
    """Text around a user message in the chat template.

    Attributes:
        prefix: template text before the user's message (system prompt, role headers, BOS written by the template).
        assistant_turn: template text after the user's message up to the assistant's first token.
    """

    prefix: str
    assistant_turn: str


def chat_pieces(tokenizer, system_prompt: str | None = None) -> ChatPieces:
    """Split the tokenizer's chat template around the user's message."""
    if not getattr(tokenizer, "chat_template", None):
        return ChatPieces(prefix="", assistant_turn="\n")
    messages = [{"role": "user", "content": _SENTINEL}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise ValueError("could not locate the user message in the tokenizer's chat template")
    prefix, assistant_turn = text.split(_SENTINEL)
    return ChatPieces(prefix=prefix, assistant_turn=assistant_turn)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added by the tokenizer (templates write their own)."""
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def leading_special_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. BOS), found by encoding with and without them."""
    sample = "Hello"
    with_special = tokenizer.encode(sample, add_special_tokens=True)
    plain = tokenizer.encode(sample, add_special_tokens=False)
    extra = len(with_special) - len(plain)
    if extra > 0 and with_special[extra:] == plain:
        return list(with_special[:extra])
    return []


def encode_context(tokenizer, text: str, system_prompt: str | None = None) -> tuple[torch.Tensor, int]:
    """Encode a context as ``[chat-template prefix | context]``, the user turn left open.

    Returns:
        ``(input_ids [1, seq], context_start)``: positions before ``context_start`` are the protected prefix.
    """
    prefix = encode_text(tokenizer, chat_pieces(tokenizer, system_prompt).prefix)
    if not prefix:
        prefix = leading_special_tokens(tokenizer)  # no chat template: still start like the tokenizer would (BOS)
    context = encode_text(tokenizer, text)
    return torch.tensor([prefix + context], dtype=torch.long), len(prefix)


def encode_query(tokenizer, question: str) -> torch.Tensor:
    """Encode a question that follows an `encode_context` context: ``"\\n\\n" question`` then the assistant turn.

    Returns:
        ``input_ids [1, n]``; ``cat([context_ids, query_ids], dim=1)`` is a well-formed chat prompt.
    """
    ids = encode_text(tokenizer, f"\n\n{question.strip()}") + encode_text(tokenizer, chat_pieces(tokenizer).assistant_turn)
    return torch.tensor([ids], dtype=torch.long)


def encode_contexts(
    tokenizer, texts: list[str], system_prompt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Several contexts as one left-padded batch for `KVzipCache.prefill`, each encoded like `encode_context`.

    Returns:
        ``(input_ids [B, S], attention_mask [B, S], context_start [B])``: pass all three to ``prefill``.
    """
    encoded = [encode_context(tokenizer, text, system_prompt) for text in texts]
    ids, mask = left_pad([row[0] for row, _ in encoded], _pad_id(tokenizer))
    padding = ids.shape[1] - mask.sum(dim=1)
    return ids, mask, padding + torch.tensor([start for _, start in encoded])


def encode_queries(tokenizer, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One question per row, each encoded like `encode_query`, left-padded: ``(query_ids [B, n], query_mask [B, n])``
    for `KVzipCache.inputs_for`."""
    return left_pad([encode_query(tokenizer, question)[0] for question in questions], _pad_id(tokenizer))


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors into ``[B, longest]`` ids and their 0/1 mask, padded on the left (what the cache takes)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :], mask[b, width - len(row) :] = torch.as_tensor(row), 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0
