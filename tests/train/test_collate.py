"""Collation for every processor layout (rlhfv_train/data/collate.py, inputs.py, prompts.py): all processor tensors
reach the batch, row operations keep each sequence's own image rows (Qwen's packed patches included), prompts come from
the chat template when there is one, and layouts the trainer cannot split are refused by name."""
import pytest
import torch

from rlhfv_train.data import synthetic
from rlhfv_train.data import (PairCollator, PromptFormat, concat_rows, load_records, repeat_rows, select_rows,
                              token_aligned)
from rlhfv_train.data.inputs import check_row_layout
from rlhfv_train.models.tiny_families import build_family

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return load_records(synthetic.generate(str(tmp_path_factory.mktemp("scenes")), 6, seed=4))[0]


def test_qwen_batch_keeps_every_processor_tensor_and_splits_packed_patches(records):
    processor, _ = build_family("qwen2-vl")
    batch = PairCollator(processor, gamma=5.0)(list(enumerate(records[:3])))
    inputs = batch.model_inputs()
    assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(inputs)
    patches = inputs["image_grid_thw"].prod(-1)
    assert inputs["pixel_values"].shape[0] == int(patches.sum()) and inputs["image_grid_thw"].shape[0] == 6
    chosen = batch.chosen().model_inputs()
    assert chosen["input_ids"].shape[0] == 3 and chosen["image_grid_thw"].shape[0] == 3
    assert torch.equal(chosen["pixel_values"], inputs["pixel_values"][:int(patches[:3].sum())])
    # Rows in any order, repeated: each row brings its own patches.
    picked = select_rows(inputs, [4, 4, 1])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), patches.cumsum(0)])
    expected = torch.cat([inputs["pixel_values"][starts[i]:starts[i + 1]] for i in (4, 4, 1)])
    assert torch.equal(picked["pixel_values"], expected)
    assert torch.equal(picked["input_ids"], inputs["input_ids"][[4, 4, 1]])
    again = repeat_rows(inputs, 2)
    assert again["image_grid_thw"].shape[0] == 12 and torch.equal(again["input_ids"][2], inputs["input_ids"][1])
    joined = concat_rows([select_rows(inputs, [0]), select_rows(inputs, [5])])
    assert torch.equal(joined["pixel_values"], select_rows(inputs, [0, 5])["pixel_values"])
    assert set(token_aligned(inputs)) == {"input_ids", "attention_mask", "mm_token_type_ids"}


def test_chat_template_prompts_and_labels(records):
    processor, _ = build_family("qwen2-vl")
    fmt = PromptFormat(processor)
    assert fmt.chat
    prompt = fmt.prompt("what do you see ?", 1)
    assert prompt.startswith("<|im_start|> user <|vision_start|>") and prompt.endswith("<|im_start|> assistant ")
    sequence = fmt.sequence("what do you see ?", "a red circle", 1)
    assert sequence.startswith(prompt) and sequence.rstrip().endswith("a red circle <|im_end|>")
    batch = PairCollator(processor, gamma=5.0)(list(enumerate(records[:2])))
    tok = processor.tokenizer
    row = batch.labels[0]
    answer = tok.convert_ids_to_tokens(row[row != -100].tolist())
    assert answer == records[0].chosen.split() + ["<|im_end|>"]  # the assistant turn and its end, nothing else
    plain = PromptFormat(processor, use_chat_template=False)
    assert not plain.chat and plain.prompt("what do you see ?", 1) == "<|image_pad|> what do you see ?"


def test_templates_that_rewrite_the_prompt_are_refused():
    tokenizer, _ = build_family("llama")
    # It numbers the turns up front, so adding the reply changes the prompt's own text.
    tokenizer.chat_template = ("turns {{ messages|length }} {% for m in messages %}{{ m['role'] }} {{ m['content'] }} "
                               "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
    with pytest.raises(ValueError, match="not write the prompt .* as a prefix.*--no-chat-template"):
        PromptFormat(tokenizer).sequence("what do you see ?", "a red circle", 0)


def test_right_padding_is_asked_of_the_call(records):
    processor, _ = build_family("qwen2-vl")
    processor.tokenizer.padding_side = "left"  # a processor that pads left by default (InternVL's does)
    batch = PairCollator(processor, gamma=5.0)(list(enumerate(records[:3])))
    assert bool((batch.attention_mask[:, 0] == 1).all())
    assert processor.tokenizer.padding_side == "left"  # the processor is left as it was


def test_a_text_only_model_refuses_image_records(records):
    tokenizer, _ = build_family("llama")
    with pytest.raises(ValueError, match=r"jsonl:1: a record with images or a video, for a model without an image processor"):
        PairCollator(tokenizer, gamma=5.0)(list(enumerate(records[:2])))


def test_unsplittable_layouts_are_refused_by_name():
    inputs = {"input_ids": torch.zeros(4, 7, dtype=torch.long), "attention_mask": torch.ones(4, 7),
              "pixel_values": torch.zeros(9, 3, 8, 8)}
    with pytest.raises(ValueError, match="pixel_values has shape .*9, 3, 8, 8.* not supported yet"):
        check_row_layout(inputs)
    with pytest.raises(ValueError, match="pixel_values has shape .*9, 3, 8, 8.* not supported yet"):
        select_rows(inputs, [0])


def test_paligemma_trains_through_its_suffix_path(records):
    """A prefix-LM processor gets the answers as suffix=: its token_type_ids mark exactly the scored tokens (answer
    and end of sequence), and our labels are the processor's own; the processor's labels never reach the model."""
    processor, _ = build_family("paligemma")
    batch = PairCollator(processor, gamma=5.0)(list(enumerate(records[:2])))
    assert "labels" not in batch.inputs and "token_type_ids" in batch.inputs
    scored = batch.labels != -100
    assert torch.equal(batch.inputs["token_type_ids"].bool() & batch.attention_mask.bool(), scored)
    from rlhfv_train.data import open_images
    images = [open_images(r) for r in records[:2]]
    own = processor(images=images + images, text=["<image> " + r.question for r in records[:2]] * 2,
                    suffix=[r.chosen for r in records[:2]] + [r.rejected for r in records[:2]], return_tensors="pt",
                    padding=True, padding_side="right")
    assert torch.equal(batch.labels, torch.where(own["attention_mask"].bool(), own["labels"], -100))


def test_gemma3_keeps_token_type_ids(records):
    processor, _ = build_family("gemma3")
    batch = PairCollator(processor, gamma=5.0)(list(enumerate(records[:2])))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert torch.equal(batch.inputs["token_type_ids"].bool(), batch.input_ids == image_id)
