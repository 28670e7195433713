"""Per-row control of one batched ``generate`` (runs in the model worker only).

``RowStops`` is a stopping criterion that ends each row on its own: at an end token, or when
that row's pair is past its deadline, and reports each finished row at once (so its reply can
leave before its batch mates finish). ``SchemaConstraint`` masks every row's logits to what
the answer's JSON Schema allows next (xgrammar), skipping rows that are finished — xgrammar's
own ``contrib.hf.LogitsProcessor`` would feed them the padding and fail.

torch, transformers and xgrammar are imported by the worker before this module is used; the
service process never imports it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

#: ``on_done(row, new_token_ids, out_of_time)`` — called once per row, when it stops.
RowDone = Callable[[int, list[int], bool], None]


class RowStops(StoppingCriteria):
    """Stop each row at an end token or at its own deadline (``time.monotonic()`` values)."""

    def __init__(
        self, prompt_length: int, deadlines: Sequence[float], eos_ids: set[int], on_done: RowDone
    ) -> None:
        self.prompt_length = prompt_length
        self.deadlines = list(deadlines)
        self.eos_ids = eos_ids
        self.on_done = on_done
        self.done: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        now = time.monotonic()
        last = input_ids[:, -1].tolist()
        for row, token in enumerate(last):
            if row in self.done:
                continue
            ended = token in self.eos_ids
            if ended or now >= self.deadlines[row]:
                self.done.add(row)
                self.on_done(row, self.new_tokens(input_ids, row), not ended)
        flags = [row in self.done for row in range(len(last))]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    def new_tokens(self, input_ids: torch.Tensor, row: int) -> list[int]:
        """The row's answer so far, without its end token."""
        tokens: list[int] = input_ids[row, self.prompt_length :].tolist()
        while tokens and tokens[-1] in self.eos_ids:
            tokens.pop()
        return tokens


class Grammars:
    """Compiled answer grammars for one tokenizer, cached by schema (compiling takes ~5-60 ms)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids)
        )
        self._compiler = xgr.GrammarCompiler(info)
        self._cache: dict[str, Any] = {}

    def compiled(self, schema: dict[str, Any]) -> Any:
        key = json.dumps(schema)  # not sorted: property order is the answer's order
        if key not in self._cache:
            # Compact JSON: free whitespace would let a weak model spend its tokens on blanks.
            self._cache[key] = self._compiler.compile_json_schema(key, any_whitespace=False)
        return self._cache[key]

    def constraint(self, per_row: Sequence[Any | None], stops: RowStops) -> SchemaConstraint:
        return SchemaConstraint(self._xgr, per_row, stops)


class SchemaConstraint(LogitsProcessor):
    """One grammar matcher per row (None: that row is not constrained). Single use."""

    def __init__(self, xgr: Any, per_row: Sequence[Any | None], stops: RowStops) -> None:
        self._xgr = xgr
        self._matchers = [None if c is None else xgr.GrammarMatcher(c) for c in per_row]
        self._stops = stops
        self._skip: set[int] = set()
        self._vocab = next(c for c in per_row if c is not None).tokenizer_info.vocab_size
        self._bitmask = xgr.allocate_token_bitmask(len(per_row), self._vocab)
        self._started = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
        if self._started:
            last = input_ids[:, -1].tolist()
            for row, matcher in enumerate(self._matchers):
                if matcher is not None and row not in self._skip and not matcher.is_terminated():
                    matcher.accept_token(last[row])
        self._started = True
        # A row that stopped at the last step has had its final token accepted above; from
        # now on it is fed padding, which its grammar must not see.
        self._skip |= self._stops.done
        for row, matcher in enumerate(self._matchers):
            if matcher is None or row in self._skip or matcher.is_terminated():
                self._bitmask[row].fill_(-1)  # every token allowed: the row is not steered
            else:
                matcher.fill_next_token_bitmask(self._bitmask, row)
        if scores.device.type == "cuda":
            self._xgr.apply_token_bitmask_inplace(scores, self._bitmask.to(scores.device))
            return scores
        masked = scores.to("cpu")
        self._xgr.apply_token_bitmask_inplace(masked, self._bitmask)
        return masked.to(scores.device)
