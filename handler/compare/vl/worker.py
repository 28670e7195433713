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
from multiprocessing.connection import Connection
from typing import Any

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
        conn.send(TAKEN)
        try:
            for index, request in enumerate(batch):
                try:
                    reply = engine.handle(request)
                except Exception as exc:
                    reply = Reply(kind="error", message=f"{type(exc).__name__}: {exc}")
                conn.send(Row(index, reply))
        except OSError:
            return  # the service died while this batch ran


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

    def handle(self, request: Request) -> Reply:
        """One pair, retried once at half the pixels if the device runs out of memory."""
        images = [_decode(jpeg) for jpeg in request.jpegs]
        deadline = time.monotonic() + request.timeout_s
        fault = request.fault or Fault()
        if fault.crash:
            ctypes.string_at(0)  # a real segfault, as a broken kernel or driver would cause
        if fault.delay_s:
            time.sleep(fault.delay_s)
        if self.on_cuda:
            self._torch.cuda.reset_peak_memory_stats(self.device)
        budget = request.max_pixels
        attempt = 0
        while True:
            attempt += 1
            used = budget
            try:
                inputs, used = encode_pair(
                    self.processor, self.sizing, images, request.prompt, budget
                )
                return self.generate(inputs, deadline, attempt, budget, fault, used)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            # Outside the except block the traceback (and the tensors its frames hold) is gone.
            inputs = None
            self.free_memory()
            if attempt >= 2 or used <= MIN_RETRY_PIXELS:
                return Reply(
                    kind="oom",
                    message=message,
                    attempts=attempt,
                    max_pixels=budget,
                    peak_memory_mb=self.peak_memory_mb(),
                )
            budget = max(MIN_RETRY_PIXELS, used // 2)

    def generate(
        self, inputs: Any, deadline: float, attempt: int, budget: int, fault: Fault, used: int
    ) -> Reply:
        torch = self._torch
        inputs = inputs.to(self.device, dtype=self.dtype)
        if fault.oom_above_pixels is not None and used > fault.oom_above_pixels:
            torch.empty(1 << 62, dtype=torch.uint8, device=self.device)  # the allocator refuses
        prompt_tokens = int(inputs["input_ids"].shape[1])
        visual_tokens = count_visual_tokens(self.processor, inputs["input_ids"])
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Reply(kind="ok", out_of_time=True, attempts=attempt, max_pixels=budget)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, max_time=remaining
            )
        elapsed = time.perf_counter() - started
        new = output[0, prompt_tokens:].tolist()
        finished = bool(new) and new[-1] in self.eos_ids
        return Reply(
            kind="ok",
            text=self.processor.decode(new, skip_special_tokens=True).strip(),
            visual_tokens=visual_tokens,
            prompt_tokens=prompt_tokens,
            new_tokens=len(new),
            attempts=attempt,
            max_pixels=budget,
            generate_ms=round(elapsed * 1e3, 1),
            # Neither the end token nor the token limit, and the time is up: max_time stopped it.
            out_of_time=not finished and len(new) < self.max_new_tokens and elapsed >= remaining,
            peak_memory_mb=self.peak_memory_mb(),
        )

    def peak_memory_mb(self) -> float | None:
        if not self.on_cuda:
            return None
        return round(self._torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def free_memory(self) -> None:
        gc.collect()
        if self.on_cuda:
            self._torch.cuda.empty_cache()


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
    processor: Any, sizing: int | None, images: list[Image.Image], prompt: str, max_pixels: int
) -> tuple[Any, int]:
    """Chat-template the pair (``Image A:``, image, ``Image B:``, image, prompt) and run the
    processor with every image held to ``max_pixels``: downscaled here if larger, and for
    pixel-area processors also capped explicitly, since checkpoints ship caps of 16,384 visual
    tokens per image. Returns the processor's inputs and the largest image's pixel count as the
    vision tower sees it (what an out-of-memory retry halves)."""
    fitted = [_fit(image, max_pixels) for image in images]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Image A:"},
                {"type": "image"},
                {"type": "text", "text": "Image B:"},
                {"type": "image"},
                {"type": "text", "text": prompt},
            ],
        }
    ]
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


def _fit(image: Image.Image, max_pixels: int) -> Image.Image:
    area = image.width * image.height
    if area <= max_pixels:
        return image
    factor = math.sqrt(max_pixels / area)
    size = (max(1, int(image.width * factor)), max(1, int(image.height * factor)))
    return image.resize(size, Image.Resampling.BICUBIC)


def _size_value(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if isinstance(value, int) else None
