"""The model worker: a child process that loads the VL model once and answers one pair at a time.

Why a process: ``generate(max_time=...)`` cannot interrupt the prompt (prefill) step and a thread
running ``generate`` cannot be cancelled, so a hard timeout needs something the service can kill.
A segfault or a CUDA error that poisons the context also dies here, not in the watcher.

torch and transformers are imported inside the functions that run in the child only, so the
service process that imports this module (to name the entry point) never loads them.
"""

from __future__ import annotations

import ctypes
import gc
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from PIL import Image

from handler.compare.vl.protocol import (
    TAKEN,
    Fault,
    LoadFailed,
    Ready,
    Reply,
    Request,
    Row,
    WorkerOptions,
)

if TYPE_CHECKING:
    from handler.compare.vl.decoding import Grammars

#: ``send(index, reply)``: one pair's reply, by its index in the batch.
Send = Callable[[int, Reply], None]

#: Below this many parameters a CPU worker runs torch on one thread (see ``Engine``).
SMALL_MODEL_PARAMS = 50_000_000
#: A retry never goes below this many pixels per image (a few visual tokens are still an image).
MIN_RETRY_PIXELS = 56 * 56


def worker_main(conn: Connection, options: WorkerOptions) -> None:
    """Entry point of the child process: load, report ``Ready``, then serve until told to stop."""
    # The service may print its result JSON on stdout (``pairwatch compare``): library chatter
    # from this process goes to stderr instead.
    os.dup2(2, 1)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Fewer, growable CUDA segments: images of varying sizes fragment the cache less.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    started = time.perf_counter()
    try:
        engine = Engine(options)
    except Exception as exc:
        conn.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(Ready(device=engine.device, load_ms=round((time.perf_counter() - started) * 1e3)))
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return  # the service is gone
        if batch is None:
            return
        try:
            conn.send(TAKEN)
            serve_batch(engine, batch, conn)
        except _ServiceGone:
            return  # the service died while this batch ran


class _ServiceGone(Exception):
    pass


def serve_batch(engine: Engine, batch: list[Request], conn: Connection) -> None:
    """Run one batch; every pair gets exactly one ``Row``, an ``error`` one if the batch failed
    for another reason than memory (the service then replaces this worker)."""
    sent: set[int] = set()

    def send(index: int, reply: Reply) -> None:
        sent.add(index)
        try:
            conn.send(Row(index, reply))
        except OSError:
            raise _ServiceGone from None

    try:
        engine.serve(batch, send)
    except _ServiceGone:
        raise
    except Exception as exc:
        message = f"{type(exc).__name__}: {str(exc)[:500]}"
        for index in range(len(batch)):
            if index not in sent:
                send(index, Reply(kind="error", message=message, batch_size=len(batch)))


@dataclass
class _Pair:
    """One request of a batch and what its attempts have learnt so far."""

    index: int
    request: Request
    #: (label, decoded picture), in the request's order.
    images: list[tuple[str, Image.Image]]
    deadline: float
    budget: int
    used: int = 0
    attempts: int = 0
    halved: bool = False

    @property
    def fault(self) -> Fault:
        return self.request.fault or Fault()


class Engine:
    """Processor + model on one device, reused for every pair this worker serves."""

    def __init__(self, options: WorkerOptions) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        self._torch = torch
        device = options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        on_cuda = device.startswith("cuda")
        self.dtype = torch.bfloat16 if on_cuda else torch.float32
        self.processor: Any = AutoProcessor.from_pretrained(options.model)  # type: ignore[no-untyped-call]
        model: Any = AutoModelForImageTextToText.from_pretrained(
            options.model, dtype=self.dtype, attn_implementation="sdpa"
        )
        self.model: Any = model.to(device).eval()
        if not device.startswith("cuda") and self.model.num_parameters() < SMALL_MODEL_PARAMS:
            # A small model's step is per-op overhead, which intra-op threads only add
            # synchronisation to: measured 6-9x faster with one thread on a loaded 2-core host.
            torch.set_num_threads(1)
        self.device = str(self.model.device)
        self.on_cuda = self.device.startswith("cuda")
        self.max_new_tokens = options.max_new_tokens
        # Greedy decoding: the same pair gives the same answer. Checkpoints ship sampling
        # settings that would only produce "ignored flag" warnings alongside do_sample=False.
        generation = self.model.generation_config
        generation.do_sample = False
        generation.temperature = generation.top_p = generation.top_k = None
        eos = generation.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if self.processor.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.processor.tokenizer.eos_token_id)
        self.sizing = pixel_area_sizing(self.processor.image_processor)
        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.pad_id: int = int(pad)
        self.grammars = _grammars(tokenizer, self.model, self.eos_ids)

    def serve(self, batch: list[Request], send: Send) -> None:
        """One batch: each pair keeps its own deadline (``Request.expires_at``, from when the
        pair was taken); ``send`` gets every pair's reply once, as soon as that pair is
        finished."""
        pairs = [
            _Pair(
                i,
                r,
                [(image.label, _decode(image.jpeg)) for image in r.images],
                r.expires_at,
                r.max_pixels,
            )
            for i, r in enumerate(batch)
        ]
        delay = max(p.fault.delay_s for p in pairs)
        if delay:
            time.sleep(delay)
        if any(p.fault.crash for p in pairs):
            ctypes.string_at(0)  # a real segfault, as a broken kernel or driver would cause
        if self.on_cuda:
            self._torch.cuda.reset_peak_memory_stats(self.device)
        self._attempt(pairs, send)

    def _attempt(self, pairs: list[_Pair], send: Send) -> None:
        """Generate for ``pairs``; out of memory, split the batch in halves and try each, and
        retry a lone pair once at half its pixels — every picture of it, overviews and crops
        alike (a pair's ``attempts`` counts its tries)."""
        sent: set[int] = set()

        def deliver(index: int, reply: Reply) -> None:
            sent.add(index)
            send(index, reply)

        for pair in pairs:
            pair.attempts += 1
        try:
            self._generate(pairs, deliver)
            return
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        # Outside the except block the traceback (and the tensors its frames hold) is gone.
        self.free_memory()
        left = [p for p in pairs if p.index not in sent]
        if len(left) > 1:
            half = len(left) // 2
            self._attempt(left[:half], send)
            self._attempt(left[half:], send)
            return
        for pair in left:
            if pair.halved or pair.used <= MIN_RETRY_PIXELS:
                send(
                    pair.index,
                    Reply(
                        kind="oom",
                        message=message,
                        attempts=pair.attempts,
                        max_pixels=pair.budget,
                        peak_memory_mb=self.peak_memory_mb(),
                    ),
                )
                continue
            pair.budget, pair.halved = max(MIN_RETRY_PIXELS, pair.used // 2), True
            self._attempt([pair], send)

    def _generate(self, pairs: list[_Pair], send: Send) -> None:
        """One batched, left-padded ``generate``; each row stops at its end token or deadline
        (``decoding.RowStops``) and is constrained to its schema (``decoding.SchemaConstraint``)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from handler.compare.vl.decoding import RowStops

        torch = self._torch
        late = [p for p in pairs if time.monotonic() >= p.deadline]
        for pair in late:
            send(
                pair.index,
                Reply(
                    kind="ok",
                    out_of_time=True,
                    attempts=pair.attempts,
                    max_pixels=pair.budget,
                    batch_size=len(pairs),
                ),
            )
        pairs = [p for p in pairs if p not in late]
        if not pairs:
            return
        encoded = []
        for pair in pairs:
            inputs, pair.used = encode_pair(
                self.processor,
                self.sizing,
                pair.images,
                pair.request.prompt,
                pair.budget,
                scale=0.5 if pair.halved else 1.0,
            )
            encoded.append(inputs)
        inputs = collate(encoded, self.pad_id).to(self.device, dtype=self.dtype)
        if any(_fault_oom(p, len(pairs)) for p in pairs):
            torch.empty(1 << 62, dtype=torch.uint8, device=self.device)  # the allocator refuses
        width = int(inputs["input_ids"].shape[1])
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        visual = [count_visual_tokens(self.processor, row) for row in inputs["input_ids"]]
        schemas = [p.request.schema for p in pairs]
        constrained = self.grammars is not None and any(s is not None for s in schemas)
        started = time.perf_counter()

        def on_done(row: int, tokens: list[int], out_of_time: bool) -> None:
            pair = pairs[row]
            send(
                pair.index,
                Reply(
                    kind="ok",
                    text=self.processor.decode(tokens, skip_special_tokens=True).strip(),
                    visual_tokens=visual[row],
                    prompt_tokens=int(prompt_tokens[row]),
                    new_tokens=len(tokens),
                    attempts=pair.attempts,
                    max_pixels=pair.budget,
                    generate_ms=round((time.perf_counter() - started) * 1e3, 1),
                    out_of_time=out_of_time,
                    peak_memory_mb=self.peak_memory_mb(),
                    constrained=constrained and schemas[row] is not None,
                    batch_size=len(pairs),
                ),
            )

        stops = RowStops(width, [p.deadline for p in pairs], self.eos_ids, on_done)
        processors = LogitsProcessorList()
        if constrained and self.grammars is not None:
            grammars = self.grammars
            compiled = [None if s is None else grammars.compiled(s) for s in schemas]
            processors.append(grammars.constraint(compiled, stops))
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                stopping_criteria=StoppingCriteriaList([stops]),
                logits_processor=processors,
                pad_token_id=self.pad_id,
            )
        for row in range(len(pairs)):
            if row not in stops.done:  # stopped by the token limit
                stops.done.add(row)
                on_done(row, stops.new_tokens(output, row), False)

    def peak_memory_mb(self) -> float | None:
        if not self.on_cuda:
            return None
        return round(self._torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def free_memory(self) -> None:
        gc.collect()
        if self.on_cuda:
            self._torch.cuda.empty_cache()


def _grammars(tokenizer: Any, model: Any, eos_ids: set[int]) -> Grammars | None:
    """The schema compiler, or None without xgrammar (answers are then only parsed and
    validated afterwards: ``vl.constrained`` false)."""
    try:
        from handler.compare.vl.decoding import Grammars

        vocab_size = int(model.get_output_embeddings().weight.shape[0])
        return Grammars(tokenizer, vocab_size, eos_ids)
    except ImportError:
        return None


def _fault_oom(pair: _Pair, batch_size: int) -> bool:
    fault = pair.fault
    if fault.oom_above_pixels is not None and pair.used > fault.oom_above_pixels:
        return True
    return fault.oom_above_batch is not None and batch_size > fault.oom_above_batch


def collate(encoded: list[Any], pad_id: int) -> Any:
    """Stack the processor outputs of single pairs into one left-padded batch: per-token
    tensors (``input_ids``, ``attention_mask``, ``mm_token_type_ids``...) padded on the left
    (``input_ids`` with ``pad_id``, the others with 0), image tensors concatenated in row
    order, which is the order the model reads image placeholders in. Encoding each pair on its
    own keeps each pair's own pixel cap."""
    import torch
    from transformers import BatchFeature

    if len(encoded) == 1:
        return encoded[0]
    width = max(int(e["input_ids"].shape[1]) for e in encoded)
    batch: dict[str, Any] = {}
    for key in encoded[0]:
        values = [e[key] for e in encoded]
        if all(
            v.dim() == 2 and v.shape == e["input_ids"].shape
            for v, e in zip(values, encoded, strict=True)
        ):
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.cat(
                [torch.nn.functional.pad(v, (width - v.shape[1], 0), value=fill) for v in values]
            )
        else:
            batch[key] = torch.cat(values)
    return BatchFeature(batch)


def pixel_area_sizing(image_processor: Any) -> int | None:
    """The resize factor (patch x merge, 28 for Qwen2-VL) when the image processor sizes images
    by pixel area (``size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}``, the
    Qwen2-VL family and the models that copy its ``smart_resize``); None for fixed-size or tiling
    processors, which the downscaling in ``encode_pair`` alone bounds."""
    size = getattr(image_processor, "size", None)
    patch = getattr(image_processor, "patch_size", None)
    merge = getattr(image_processor, "merge_size", None)
    if size is None or not (isinstance(patch, int) and isinstance(merge, int)):
        return None
    longest = _size_value(size, "longest_edge")
    # Edge lengths are a few thousand at most; pixel areas are far larger.
    return patch * merge if longest is not None and longest > 100_000 else None


def encode_pair(
    processor: Any,
    sizing: int | None,
    images: Sequence[tuple[str, Image.Image]],
    prompt: str,
    max_pixels: int,
    *,
    scale: float = 1.0,
) -> tuple[Any, int]:
    """Chat-template the pair (each picture after its label — ``Image A:``, image A, ``Image
    B:``, image B, then any crops — and the prompt last) and run the processor with every
    picture held to ``max_pixels``: downscaled here if larger, and for pixel-area processors
    also capped explicitly, since checkpoints ship caps of 16,384 visual tokens per image.
    ``scale`` (0.5 on an out-of-memory retry) also shrinks each picture to that share of its
    own pixels, so a retry halves the pair's pixels, not only the largest picture's. Returns
    the processor's inputs and the largest picture's pixel count as the vision tower sees it
    (what an out-of-memory retry halves)."""
    fitted = [fit_pixels(image, max_pixels, scale) for _, image in images]
    content: list[dict[str, Any]] = []
    for label, _ in images:
        content += [{"type": "text", "text": label}, {"type": "image"}]
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs: dict[str, Any] = {}
    if sizing is not None:
        current_min = _size_value(processor.image_processor.size, "shortest_edge")
        kwargs["size"] = {
            "shortest_edge": min(current_min or MIN_RETRY_PIXELS, max_pixels),
            "longest_edge": max_pixels,
        }
    inputs = processor(text=[text], images=fitted, return_tensors="pt", **kwargs)
    grid = inputs.get("image_grid_thw") if sizing is not None else None
    if grid is not None:
        patch = int(processor.image_processor.patch_size)
        used = int((grid[:, 1] * grid[:, 2]).max()) * patch * patch
    else:
        used = max(image.width * image.height for image in fitted)
    return inputs, used


def count_visual_tokens(processor: Any, input_ids: Any) -> int | None:
    """Image placeholder tokens in the prompt: what the vision tower's output occupies."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None):
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if token_id is None:
        return None
    return int((input_ids == token_id).sum())


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM is ``torch.OutOfMemoryError``; the CPU allocator raises a plain RuntimeError."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text
    )


def _decode(jpeg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpeg))
    image.load()
    return image.convert("RGB")


def fit_pixels(
    image: Image.Image,
    max_pixels: int,
    scale: float = 1.0,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """``image`` downscaled to at most ``max_pixels`` and to ``scale`` of its own pixels (never
    below MIN_RETRY_PIXELS for that), never upscaled. The worker fits every picture with it,
    the comparator its crops into their share of a pair's budget (with LANCZOS)."""
    area = image.width * image.height
    target = min(max_pixels, max(MIN_RETRY_PIXELS, int(area * scale)))
    if area <= target:
        return image
    factor = math.sqrt(target / area)
    size = (max(1, int(image.width * factor)), max(1, int(image.height * factor)))
    return image.resize(size, resample)


def _size_value(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if isinstance(value, int) else None
