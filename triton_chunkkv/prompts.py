"""A prompt as two segments: the context (chat template head, document) and the question (the
question, the template's tail, the answer prefix). The question-agnostic setting compresses the
first alone (``integrations.pipeline``, the evaluation's ``--settings question-agnostic``); the
question-aware setting uses their concatenation. Plain text in, token ids out: no model, so
the command line can build prompts before anything heavy is imported."""

from __future__ import annotations

import torch

_QUESTION_MARK = "\x00question\x00"


def prompt_segments(tokenizer, context: str, question: str, answer_prefix="", chat=True):
    """``(context_text, question_text)`` whose concatenation is the whole prompt: the user turn
    ``context + "\\n\\n" + question`` (in the chat template when ``chat`` and the tokenizer has
    one) followed by ``answer_prefix``."""
    if chat and getattr(tokenizer, "chat_template", None):
        turn = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{context}\n\n{_QUESTION_MARK}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        head, tail = turn.split(_QUESTION_MARK)
        return head, question + tail + answer_prefix
    return f"{context}\n\n", f"{question}\n\n{answer_prefix}"


def segment_ids(tokenizer, text: str, first: bool, chat: bool) -> torch.Tensor:
    """``[1, n]`` token ids of one segment; only a plain first segment gets the tokenizer's
    special tokens (a chat template writes its own)."""
    templated = chat and getattr(tokenizer, "chat_template", None)
    special = first and not templated
    return tokenizer(text, return_tensors="pt", add_special_tokens=special).input_ids
