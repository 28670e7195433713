"""Build a tiny random-weight Qwen2-VL checkpoint offline: ``python -m tests.support.tiny_vlm DIR``.

The Hugging Face hub is unreachable from CI, so the VL comparator's tests need a model they can
make themselves. This one uses the real ``Qwen2VLConfig``/``Qwen2VLForConditionalGeneration``
classes, the real Qwen2-VL image processor settings (patch 14, spatial merge 2, temporal patch 2,
the checkpoints' 12,845,056-pixel cap) and a byte-level BPE tokenizer trained here with the
``tokenizers`` library that carries the real Qwen special tokens and chat template. Token counts
therefore match production checkpoints, while the whole folder stays under 1 MB and generates in
well under a second on CPU. Random weights answer gibberish: that is the point for the
``model_output_invalid`` path.

``--answer TEXT`` wires the model to reply TEXT whatever the images (see ``wire_answer``), which
gives the tests a real end-to-end "ok" path through the processor and ``generate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

#: Qwen2-VL-Instruct's chat template, as shipped with the checkpoints.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: What the tokenizer learns its merges from: prompt and answer vocabulary, so that prompts and
#: JSON answers are a few dozen tokens, as with the real vocabulary.
_CORPUS = [
    "You are a helpful assistant. Compare image A with image B.",
    'Answer with JSON only: {"similarity": 0.5, "differences": [{"aspect": "color", '
    '"element": "car", "description": "The car is red in A and blue in B."}], '
    '"summary": "The images show the same scene with one change."}',
    "objects text people layout presence position color shape size",
    "The first image and the second image are similar. There are no differences.",
    "0123456789 .,:;!?'\"()[]{}<>-_/\\ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]

#: Vision/patch settings of every Qwen2-VL and Qwen2.5-VL checkpoint.
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 14, 2, 2
CHECKPOINT_MAX_PIXELS = 12_845_056  # 16,384 visual tokens per image
CHECKPOINT_MIN_PIXELS = 3_136
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen2VLProcessor:
    image_processor = Qwen2VLImageProcessor(
        min_pixels=CHECKPOINT_MIN_PIXELS,
        max_pixels=CHECKPOINT_MAX_PIXELS,
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )
    video_processor = Qwen2VLVideoProcessor(
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE
    )
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> Qwen2VLForConditionalGeneration:
    def token_id(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    hidden, heads = 64, 4
    head_dim = hidden // heads
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            # The three M-RoPE sections (time, height, width) share head_dim / 2 frequencies.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": hidden,  # the merger projects straight into the text width
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        },
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.do_sample = False
    return model.eval()


def wire_answer(
    model: Qwen2VLForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, answer: str
) -> None:
    """Make greedy decoding reply ``answer`` whatever the images and prompt.

    ``answer`` becomes one (non-special) token. The text blocks' output projections are zeroed,
    so every block still runs (prefill costs what it costs) but the residual stream is the token
    embedding alone and the logits depend on the last token only: the generation prompt's final
    token points to the answer token and the answer token points to ``<|im_end|>``.
    """
    tokenizer.add_tokens([answer])
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    prompt_end = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=True
    )["input_ids"][-1]
    answer_id = int(tokenizer.convert_tokens_to_ids(answer))
    eos_id = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    language = model.model.language_model
    with torch.no_grad():
        for layer in language.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = language.embed_tokens.weight
        head = model.lm_head.weight
        for source, target, axis in ((prompt_end, answer_id, 0), (answer_id, eos_id, 1)):
            direction = torch.zeros(embeddings.shape[1])
            direction[axis] = 1.0
            embeddings[source] = direction
            head[target] = 100.0 * direction


def build(directory: Path, answer: str | None = None) -> Path:
    """Write the tiny checkpoint (model, tokenizer, processor) into ``directory``."""
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer)
    if answer is not None:
        wire_answer(model, tokenizer, answer)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--answer", help="wire the model to always reply with this text")
    args = parser.parse_args(argv)
    build(args.directory, args.answer)
    size = sum(p.stat().st_size for p in args.directory.iterdir() if p.is_file())
    print(json.dumps({"directory": str(args.directory), "bytes": size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
