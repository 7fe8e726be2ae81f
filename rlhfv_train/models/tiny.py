"""The embedded default model: a tiny LLaVA (CLIP vision tower + Llama decoder) with random weights, its word-level
tokenizer and image processor all built in code, so the trainer runs offline with no hub download.

It is a real Hugging Face image-text-to-text model (LlavaForConditionalGeneration + LlavaProcessor), so the trainer
exercises exactly the code path a user's model takes.
"""
from __future__ import annotations

import torch

from ..data.synthetic import VOCABULARY

TINY_CONFIG = {
    "image_size": 32,
    "patch_size": 8,
    "vision": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4},
    "text": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "max_position_embeddings": 256},
}
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")


def build_tokenizer(words=VOCABULARY, *, special_tokens=SPECIAL_TOKENS, eos_token="</s>", extra_special_tokens=None,
                    chat_template=None):
    """A whitespace word-level tokenizer over `words` plus the special tokens (the first four are pad, unk, bos and
    the default eos; a model family adds its own, e.g. Qwen's <|image_pad|>, named in `extra_special_tokens`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(special_tokens) + sorted(set(words) - set(special_tokens)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    named = {"image_token": "<image>"} if extra_special_tokens is None else extra_special_tokens
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token=eos_token, pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens=named)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _image_processor(image_size: int):
    try:  # the PIL backend: the torchvision one is not installable on CPU-only machines
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def build_processor(config=TINY_CONFIG, words=VOCABULARY):
    """The tiny model's processor; `words` other than the scenes' vocabulary give e.g. a tiny judge its "A" and "B"."""
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=_image_processor(config["image_size"]), tokenizer=build_tokenizer(words),
                          patch_size=config["patch_size"], vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


def build_model(processor, config=TINY_CONFIG, seed: int = 0, vocab_size: int | None = None):
    """Random-weight tiny LLaVA matching `processor`'s tokenizer; deterministic for a given seed. `vocab_size` pads
    the vocabulary (unused rows) to give the model a real LLM's lm_head size, for benchmarks."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(image_size=config["image_size"], patch_size=config["patch_size"],
                              projection_dim=config["vision"]["hidden_size"], **config["vision"])
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    text = LlamaConfig(vocab_size=vocab_size or len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config["text"])
    llava = LlavaConfig(vision_config=vision, text_config=text,
                        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                        vision_feature_select_strategy="default", vision_feature_layer=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(llava)
