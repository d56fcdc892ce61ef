"""Compress a context once, then answer several questions on it.

kvpress's question-agnostic setting: the prompt is cut into the context (chat template head,
then the document) and the question (then the template's tail and the answer prefix). The
context alone is prefilled and compressed, so the observation window is the end of the
context: selection cannot know which question comes. Each question then runs on a copy of the
compressed cache, as a several-token call followed by ordinary decoding. With
``mode="question"`` the cache keeps every key and each question selects again when it is read
(over context and question, with the question's last queries), so its answer reads the chunks
that question points at.

    from triton_chunkkv.integrations.pipeline import CompressedContext

    context = CompressedContext.compress(model, tokenizer, document, keep_ratio=0.2)
    context.answer("Who wrote the letter?")

or, with transformers' pipeline ergonomics (the task is registered on import):

    import triton_chunkkv.integrations.pipeline  # noqa: F401
    pipe = transformers.pipeline("chunkkv-text-generation", model=model, tokenizer=tokenizer)
    pipe(document, questions=["Who?", "Where?"], keep_ratio=0.2)["answers"]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, DynamicCache, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from ..prompts import prompt_segments, segment_ids
from .hf import ChunkKVState, cache_kwargs, chunkkv

TASK = "chunkkv-text-generation"


@dataclass
class CompressedContext:
    """A context prefilled and compressed once (:meth:`compress`); :meth:`answer` runs each
    question on a copy of its cache, inside a ``chunkkv`` context with the same options."""

    model: object
    tokenizer: object
    context_ids: torch.Tensor  # [1, T]
    cache: DynamicCache
    state: ChunkKVState
    options: dict = field(default_factory=dict)
    chat: bool = True

    @classmethod
    @torch.no_grad()
    def compress(cls, model, tokenizer, context: str, *, chat=True, **options):
        """Prefill ``context`` (as the head of a chat turn, see :func:`prompt_segments`) inside
        ``chunkkv(model, **options)``: ``keep_ratio`` or ``budget``, ``mode``, ``policy``, ..."""
        head, _ = prompt_segments(tokenizer, context, "", chat=chat)
        context_ids = segment_ids(tokenizer, head, first=True, chat=chat).to(model.device)
        cache = DynamicCache(config=model.config)
        with chunkkv(model, **options) as state:
            model(context_ids, **cache_kwargs(model, cache))
        state.require_prefill()
        return cls(model, tokenizer, context_ids, cache, state, options, chat)

    @torch.no_grad()
    def answer(self, question: str, *, answer_prefix="", max_new_tokens=64) -> str:
        """The greedy answer to ``question`` about the compressed context."""
        _, text = prompt_segments(self.tokenizer, "", question, answer_prefix, chat=self.chat)
        question_ids = segment_ids(self.tokenizer, text, first=False, chat=self.chat)
        input_ids = torch.cat([self.context_ids, question_ids.to(self.context_ids.device)], dim=1)
        cache = copy.deepcopy(self.cache)  # each question starts from the compressed context
        eos = self.tokenizer.eos_token_id
        with chunkkv(self.model, **self.options):
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                **cache_kwargs(self.model, cache),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=eos,
            )
        return self.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


class ChunkKVTextGeneration(Pipeline):
    """``pipeline("chunkkv-text-generation")``: ``pipe(context, question=... | questions=[...],
    answer_prefix="", max_new_tokens=64, chat=True, **chunkkv options)`` compresses the context
    once and returns ``{"answer": str}`` or ``{"answers": [str, ...]}``."""

    def _sanitize_parameters(
        self,
        question=None,
        questions=None,
        answer_prefix="",
        max_new_tokens=64,
        chat=True,
        **options,
    ):
        # Also called with no arguments when the pipeline is built.
        preprocess = {"question": question, "questions": questions}
        forward = dict(
            answer_prefix=answer_prefix, max_new_tokens=max_new_tokens, chat=chat, options=options
        )
        return preprocess, forward, {}

    def preprocess(self, context, question=None, questions=None):
        if (question is None) == (questions is None):
            raise ValueError("pass exactly one of question and questions")
        asked = [question] if question is not None else list(questions)
        return {"context": context, "questions": asked, "single": question is not None}

    def _forward(self, inputs, answer_prefix, max_new_tokens, chat, options):
        context = CompressedContext.compress(
            self.model, self.tokenizer, inputs["context"], chat=chat, **options
        )
        answers = [
            context.answer(q, answer_prefix=answer_prefix, max_new_tokens=max_new_tokens)
            for q in inputs["questions"]
        ]
        return {"answers": answers, "single": inputs["single"]}

    def postprocess(self, outputs):
        if outputs["single"]:
            return {"answer": outputs["answers"][0]}
        return {"answers": outputs["answers"]}


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=ChunkKVTextGeneration, pt_model=AutoModelForCausalLM
)
