"""Tiny versions of the model families people align, built in code from transformers' own config, model and processor
classes (random weights, no download): test fixtures (the family matrix, tests/train/test_families.py) that also prove
docs/models.md's support table (support_table.py), `benchmarks/trainer.py --family NAME`, and anyone who wants a
family-shaped model to try the trainers on. A real checkpoint needs no entry here: the trainers load any local
Hugging Face folder (loading.py), and the fused-linear route checks each model against its own logits.

Each family has a word-level tokenizer over the synthetic scenes' words plus the family's own special tokens, its
real image processor (the PIL backend) and, where the family has one, a chat template in its own format. Bodies are
2 layers of width 64; `vocab_size` pads the vocabulary to a real model's (unused rows), for benchmarks.

transformers' video processors need torchvision, which does not import beside PyPI's CPU-only torch wheel; where
it imports, the families that take video records (Family.video: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision,
SmolVLM, InternVL) carry their own video processor; elsewhere they are built with an image-only subclass of their
processor (processors.without_video): same class, same __call__, no video processor (loading.py loads saved ones
the same way when torchvision is missing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..data.synthetic import VOCABULARY
from . import tiny
from .processors import with_video

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
# ChatML, as Qwen writes it (tokens separated by spaces for the word-level tokenizer).
CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }} "
          "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> "
          "<|vision_end|> {% elif c['type'] == 'video' %}<|vision_start|> <|video_pad|> <|vision_end|> "
          "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
QWEN_SPECIAL = ("<pad>", "<unk>", "<s>", "<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")
CHAT_WORDS = ("user", "assistant", "system")


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str   # the transformers class built
    kind: str          # "text" (a causal LM and its tokenizer) or "image-text" (a VLM and its processor)
    build: Callable    # (vocab_size, seed) -> (processor or tokenizer, model)
    needs: tuple[str, ...] = ()  # packages its transformers processor imports beyond transformers' own
    video: bool = False  # built with its video processor where torchvision imports (video records)


def _seeded(seed, make):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def _text_family(name, config_name, model_class, **extra):
    def build(vocab_size=None, seed=0):
        import transformers
        tokenizer = tiny.build_tokenizer()
        config = getattr(transformers, config_name)(**_ids(tokenizer, vocab_size), **TEXT, **extra)
        return tokenizer, _seeded(seed, lambda: transformers.AutoModelForCausalLM.from_config(config))
    return Family(name, model_class, "text", build)


def _llava(vocab_size=None, seed=0):
    processor = tiny.build_processor()
    return processor, tiny.build_model(processor, seed=seed, vocab_size=vocab_size).eval()


QWEN_NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
              "vision_eos_token": "<|vision_end|>"}


def _qwen_ids(tokenizer):
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"))}


def _qwen_vl(generation):
    """Qwen2-VL (2), Qwen2.5-VL (2.5): ChatML prompts, dynamic-resolution patches packed as pixel_values
    [sum of patches, 3 * 2 * 14 * 14] with image_grid_thw, mrope positions."""
    def build(vocab_size=None, seed=0):
        import transformers as tf
        tokenizer = _tokenizer(QWEN_SPECIAL, "<|im_end|>", QWEN_NAMED)
        images = tf.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                             temporal_patch_size=2)
        processor_class = {"2": tf.Qwen2VLProcessor, "2.5": tf.Qwen2_5_VLProcessor}[generation]
        video = lambda: tf.Qwen2VLVideoProcessor(  # noqa: E731  (the image processor's patching, 2 frames a patch)
            min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2)
        processor = with_video(processor_class, video, image_processor=images, tokenizer=tokenizer,
                               chat_template=CHATML)
        text = dict(TEXT, **_ids(tokenizer, vocab_size), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
        vision = dict(depth=2, hidden_size=64, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      in_channels=3)
        if generation == "2":
            vision.update(embed_dim=32, mlp_ratio=2)
            config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tokenizer))
            model_class = tf.Qwen2VLForConditionalGeneration
        else:
            vision.update(intermediate_size=128, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
            config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tokenizer))
            model_class = tf.Qwen2_5_VLForConditionalGeneration
        return processor, _seeded(seed, lambda: model_class(config))
    return build


def _tokenizer(special, eos, named, extra_words=()):
    return tiny.build_tokenizer(list(VOCABULARY) + list(CHAT_WORDS) + list(extra_words), special_tokens=special,
                                eos_token=eos, extra_special_tokens=named)


def _ids(tokenizer, vocab_size):
    """The text config's vocabulary and special ids for `tokenizer` (vocab_size pads it)."""
    return dict(vocab_size=max(vocab_size or 0, len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _clip():
    import transformers as tf
    return tf.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, projection_dim=48)


SIGLIP = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, model_type="siglip_vision_model")
PINPOINTS = [[32, 32], [32, 64], [64, 32]]  # LLaVA-NeXT / OneVision "anyres" grids at this size


def _qwen3_vl(vocab_size=None, seed=0):
    """Qwen3-VL: as Qwen2-VL with 16-pixel patches, interleaved mrope and deepstack visual features."""
    import transformers as tf
    tokenizer = _tokenizer(QWEN_SPECIAL, "<|im_end|>", QWEN_NAMED)
    images = tf.Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=64 * 64, patch_size=16, merge_size=2,
                                         temporal_patch_size=2)
    video = lambda: tf.Qwen3VLVideoProcessor(  # noqa: E731  (the image processor's pixel budget and patching)
        size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64}, patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = with_video(tf.Qwen3VLProcessor, video, image_processor=images, tokenizer=tokenizer,
                           chat_template=CHATML)
    text = dict(TEXT, **_ids(tokenizer, vocab_size), head_dim=16,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[1])
    config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tokenizer),
                              vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"))
    return processor, _seeded(seed, lambda: tf.Qwen3VLForConditionalGeneration(config))


def _llava_next(vocab_size=None, seed=0):
    """LLaVA-NeXT: anyres tiles, pixel_values [B, tiles, C, H, W] with image_sizes."""
    import transformers as tf
    tokenizer = tiny.build_tokenizer()
    images = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                           image_grid_pinpoints=PINPOINTS)
    processor = tf.LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      image_token="<image>")
    text = tf.LlamaConfig(**_ids(tokenizer, vocab_size), **TEXT)
    config = tf.LlavaNextConfig(vision_config=_clip(), text_config=text,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="default",
                                vision_feature_layer=-1)
    return processor, _seeded(seed, lambda: tf.LlavaNextForConditionalGeneration(config))


def _llava_onevision(vocab_size=None, seed=0):
    """LLaVA-OneVision: SigLIP + Qwen2, anyres, image_sizes and batch_num_images, ChatML."""
    import transformers as tf
    tokenizer = _tokenizer(QWEN_SPECIAL + ("<image>", "<video>"), "<|im_end|>",
                           {"image_token": "<image>", "video_token": "<video>"})
    images = tf.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    processor = with_video(
        tf.LlavaOnevisionProcessor, lambda: tf.LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}),
        image_processor=images, tokenizer=tokenizer, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=CHATML.replace("<|vision_start|> <|image_pad|> <|vision_end|> ", "<image> ").replace(
            "<|vision_start|> <|video_pad|> <|vision_end|> ", "<video> "),
        image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9")
    config = tf.LlavaOnevisionConfig(
        text_config=dict(TEXT, **_ids(tokenizer, vocab_size), model_type="qwen2"), vision_config=SIGLIP,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    return processor, _seeded(seed, lambda: tf.LlavaOnevisionForConditionalGeneration(config))


IDEFICS_SPECIAL = ("<pad>", "<unk>", "<s>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                   "<global-img>", "</s>")
IDEFICS_TEMPLATE = ("{{ bos_token }} {% for m in messages %}{{ m['role'] | capitalize }}: {% if m['content'] is string "
                    "%}{{ m['content'] }} {% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                    "{% elif c['type'] == 'video' %}<video> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif "
                    "%}<end_of_utterance> {% endfor %}"
                    "{% if add_generation_prompt %}Assistant: {% endif %}")


def _idefics(smol):
    """Idefics3 and SmolVLM: SigLIP-style tower + Llama, pixel_values [B, images, C, H, W] with
    pixel_attention_mask; the processors' default image splitting (size / max_image_size 64 / 32 pixels here, the
    checkpoints' 1456 / 364: a scene is 4 crops and the global image)."""
    def build(vocab_size=None, seed=0):
        import transformers as tf
        tokenizer = _tokenizer(IDEFICS_SPECIAL, "<end_of_utterance>", {"image_token": "<image>"},
                               ("User:", "Assistant:"))
        image_class = tf.SmolVLMImageProcessorPil if smol else tf.Idefics3ImageProcessorPil
        images = image_class(do_image_splitting=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
        if smol:  # a video: each frame one image of max_image_size, after "Frame from 00:0s:" (the processor's)
            video = lambda: tf.SmolVLMVideoProcessor(  # noqa: E731
                size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
            processor = with_video(tf.SmolVLMProcessor, video, image_processor=images, tokenizer=tokenizer,
                                   image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
        else:
            processor = tf.Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                             chat_template=IDEFICS_TEMPLATE)
        text = dict(TEXT, **_ids(tokenizer, vocab_size), model_type="llama")
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                      patch_size=8)
        config_class, model_class = ((tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration) if smol else
                                     (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration))
        config = config_class(text_config=text, vision_config=vision, image_token_id=processor.image_token_id,
                              scale_factor=2)
        return processor, _seeded(seed, lambda: model_class(config))
    return build


GEMMA_SPECIAL = ("<pad>", "<unk>", "<s>", "<end_of_turn>", "<start_of_turn>", "<start_of_image>", "<end_of_image>",
                 "<image_soft_token>", "</s>")
GEMMA_TEMPLATE = ("{{ bos_token }} {% for m in messages %}<start_of_turn> {{ 'model' if m['role'] == 'assistant' else "
                  "m['role'] }} {% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}<start_of_image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                  "{% endif %}<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn> model "
                  "{% endif %}")


def _gemma3(vocab_size=None, seed=0):
    """Gemma 3 image-text: SigLIP + Gemma 3, token_type_ids marking the image tokens."""
    import transformers as tf
    tokenizer = _tokenizer(GEMMA_SPECIAL, "<end_of_turn>", {"image_token": "<image_soft_token>",
                                                            "boi_token": "<start_of_image>",
                                                            "eoi_token": "<end_of_image>"}, ("model",))
    images = tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = tf.Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=GEMMA_TEMPLATE,
                                   image_seq_length=4)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("boi_token_index", "<start_of_image>"), ("eoi_token_index", "<end_of_image>"),
        ("image_token_index", "<image_soft_token>"))}
    config = tf.Gemma3Config(text_config=dict(TEXT, **_ids(tokenizer, vocab_size), head_dim=16),
                             vision_config={k: v for k, v in SIGLIP.items() if k != "model_type"},
                             mm_tokens_per_image=4, **ids)
    return processor, _seeded(seed, lambda: tf.Gemma3ForConditionalGeneration(config))


def _paligemma(vocab_size=None, seed=0):
    """PaliGemma: SigLIP + Gemma 2 as a prefix-LM; trained through its processor's suffix= path, token_type_ids 1 on
    the answer."""
    import transformers as tf
    tokenizer = tiny.build_tokenizer()
    images = tf.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    images.image_seq_length = 16  # what PaliGemmaProcessor reads: (32 / 8) ** 2 patches
    processor = tf.PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)
    config = tf.PaliGemmaConfig(text_config=dict(TEXT, **_ids(tokenizer, vocab_size), head_dim=16,
                                                 model_type="gemma2"),
                                vision_config=SIGLIP, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                projection_dim=64, hidden_size=64)
    return processor, _seeded(seed, lambda: tf.PaliGemmaForConditionalGeneration(config))


LLAMA3_SPECIAL = ("<pad>", "<unk>", "<s>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|image|>",
                  "</s>")
LLAMA3_TEMPLATE = ("{{ bos_token }} {% for m in messages %}<|start_header_id|> {{ m['role'] }} <|end_header_id|> "
                   "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
                   "{% if c['type'] == 'image' %}<|image|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
                   "<|eot_id|> {% endfor %}{% if add_generation_prompt %}<|start_header_id|> assistant "
                   "<|end_header_id|> {% endif %}")


def _mllama(vocab_size=None, seed=0):
    """Mllama (Llama 3.2 Vision): cross-attention layers, tiles with aspect_ratio_ids / mask, cross_attention_mask."""
    import transformers as tf
    tokenizer = _tokenizer(LLAMA3_SPECIAL, "<|eot_id|>", {"image_token": "<|image|>"})
    images = tf.MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=2)
    processor = tf.MllamaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=LLAMA3_TEMPLATE)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=[1], max_position_embeddings=512,
                **_ids(tokenizer, (vocab_size or 0) or len(tokenizer) + 8))  # Mllama's vocab has the image token
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4, intermediate_size=64,
                  vision_output_dim=64, image_size=28, patch_size=14, max_num_tiles=2, intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    config = tf.MllamaConfig(text_config=text, vision_config=vision,
                             image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    return processor, _seeded(seed, lambda: tf.MllamaForConditionalGeneration(config))


def _internvl(vocab_size=None, seed=0):
    """InternVL: InternViT + Qwen2, ChatML, the checkpoints' dynamic tiling (crop_to_patches, 1-12 tiles and a
    thumbnail per image; 16-pixel tiles here: a 32-pixel scene is 4 tiles + the thumbnail), pixel_values
    [sum of tiles, C, H, W]."""
    import transformers as tf
    tokenizer = _tokenizer(QWEN_SPECIAL + ("<img>", "</img>", "<IMG_CONTEXT>"), "<|im_end|>",
                           {"start_image_token": "<img>", "end_image_token": "</img>",
                            "context_image_token": "<IMG_CONTEXT>", "video_token": "<|video_pad|>"})
    images = tf.GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1,
                                         max_patches=12)
    # a video: its frames as one tile each, "Frame1: <img> ... </img>" and so on (the processor writes them)
    processor = with_video(
        tf.InternVLProcessor, lambda: tf.InternVLVideoProcessor(size={"height": 16, "width": 16}),
        image_processor=images, tokenizer=tokenizer, image_seq_length=1,
        chat_template=CHATML.replace("<|vision_start|> <|image_pad|> <|vision_end|> ", "<IMG_CONTEXT> ").replace(
            "<|vision_start|> <|video_pad|> <|vision_end|> ", "<|video_pad|> "))
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=[16, 16], patch_size=[8, 8])
    config = tf.InternVLConfig(text_config=dict(TEXT, **_ids(tokenizer, vocab_size), model_type="qwen2"),
                               vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                               image_seq_length=1, downsample_ratio=0.5)
    return processor, _seeded(seed, lambda: tf.InternVLForConditionalGeneration(config))


FAMILIES = {f.name: f for f in (
    _text_family("llama", "LlamaConfig", "LlamaForCausalLM"),
    _text_family("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    _text_family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", head_dim=16),
    _text_family("mistral", "MistralConfig", "MistralForCausalLM"),
    _text_family("phi3", "Phi3Config", "Phi3ForCausalLM"),
    _text_family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", head_dim=16, final_logit_softcapping=30.0),
    _text_family("gemma3-text", "Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16),
    _text_family("cohere", "CohereConfig", "CohereForCausalLM", logit_scale=0.0625),
    _text_family("granite", "GraniteConfig", "GraniteForCausalLM", logits_scaling=8.0),
    Family("llava", "LlavaForConditionalGeneration", "image-text", _llava),
    Family("llava-next", "LlavaNextForConditionalGeneration", "image-text", _llava_next),
    Family("llava-onevision", "LlavaOnevisionForConditionalGeneration", "image-text", _llava_onevision, video=True),
    Family("qwen2-vl", "Qwen2VLForConditionalGeneration", "image-text", _qwen_vl("2"), video=True),
    Family("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", "image-text", _qwen_vl("2.5"), video=True),
    Family("qwen3-vl", "Qwen3VLForConditionalGeneration", "image-text", _qwen3_vl, video=True),
    Family("idefics3", "Idefics3ForConditionalGeneration", "image-text", _idefics(smol=False)),
    Family("smolvlm", "SmolVLMForConditionalGeneration", "image-text", _idefics(smol=True), needs=("num2words",),
           video=True),
    Family("paligemma", "PaliGemmaForConditionalGeneration", "image-text", _paligemma),
    Family("gemma3", "Gemma3ForConditionalGeneration", "image-text", _gemma3),
    Family("mllama", "MllamaForConditionalGeneration", "image-text", _mllama),
    Family("internvl", "InternVLForConditionalGeneration", "image-text", _internvl, video=True),
)}


def build_family(name: str, *, vocab_size: int | None = None, seed: int = 0):
    """(processor or tokenizer, model in eval mode) of the tiny `name` family."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name].build(vocab_size=vocab_size, seed=seed)
