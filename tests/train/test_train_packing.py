"""--packing in both trainers (rlhfv_train/data/packed_rows.py, models/packed_model.py): the row plan, the packed
model inputs (images kept with their sequences, tails continuing their row's last sequence, mRoPE position ids), the
packed forward equal to the padded one, and a few training steps of each trainer equal to the padded run's within
rounding, on both scoring paths. The family matrix (tests/train/test_families.py) runs every family packed."""
import json
import os

import pytest
import torch

from rlhfv_train.data import load_records, PairCollator, synthetic
from rlhfv_train.ddpo import build_parser, config_from_args
from rlhfv_train.data.packed_rows import pack_batch, pack_for_loss, plan_rows
from rlhfv_train.grpo import GRPOConfig, train_grpo
from rlhfv_train.grpo import build_parser as grpo_parser
from rlhfv_train.grpo import config_from_args as grpo_config
from rlhfv_train.models import UnsupportedModelError, tiny
from rlhfv_train.models.tiny_families import build_family
from rlhfv_train.models import packed_model
from rlhfv_train.models.packed_model import check_packing, mrope_index
from rlhfv_train.ddpo import TrainConfig, train

pytest.importorskip("PIL")


def test_plan_rows_first_fit_longest_first():
    lengths = [5, 3, 9, 1, 2, 12]
    rows = plan_rows(lengths, 12, 10)
    # capacity max(10, 12); longest first, each into the first row with room: [12] [9, 3] [5, 2, 1]; within a row
    # the batch's order; every row as long as the fullest (12)
    assert rows.shape == (3, 12) and rows.order == [5, 1, 2, 0, 3, 4]
    assert rows.cu_seqlens == [0, 12, 15, 24, 29, 30, 36]  # a row's tail joins its last sequence
    source = rows.source.view(rows.shape)
    assert source[0].tolist() == list(range(60, 72))
    assert source[1].tolist() == [12, 13, 14] + list(range(24, 33))
    assert source[2].tolist() == [0, 1, 2, 3, 4, 36, 48, 49, -1, -1, -1, -1]
    padded = torch.arange(6 * 12).view(6, 12)
    positions = rows.positions(torch.arange(12).expand(6, 12))
    assert positions[2].tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5]  # the tail counts on
    assert rows.pack(padded)[2, 8:].tolist() == [49] * 4  # tails repeat the row's last token...
    assert rows.pack(padded, -100)[2, 8:].tolist() == [-100] * 4  # ...or take the fill
    real = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    assert torch.equal(rows.unpack(rows.pack(padded), (6, 12), fill=-1), torch.where(real, padded, -1))
    assert rows.per_sequence(torch.arange(6) * 10).tolist() == [50, 10, 20, 0, 30, 40]
    assert rows.pairs().tolist() == [[3, 4], [1, 5], [2, 0]]  # padded rows (i, i + 3) in the stream
    in_order = plan_rows(lengths, 12, 10, in_order=True)  # [5, 3] [9, 1, 2] [12]
    assert in_order.order == list(range(6)) and in_order.cu_seqlens == [0, 5, 12, 21, 22, 24, 36]
    default = plan_rows([5, 3, 2, 4], 5)  # the default capacity is the longest sequence: [5] [4] [3, 2]
    assert default.shape == (3, 5) and default.cu_seqlens == [0, 5, 10, 13, 15]
    with pytest.raises(ValueError, match="max_tokens_per_row must be a positive int or None"):
        plan_rows(lengths, 12, 0)


def test_packed_inputs_keep_images_with_their_sequences(dataset):
    records, _ = load_records(dataset)
    processor = tiny.build_processor()
    batch = PairCollator(processor, gamma=5.0)(list(enumerate(records[:3])))
    inputs = batch.model_inputs()
    labels, weights = batch.next_token_targets()
    packed, (packed_labels, packed_weights), options, rows = pack_for_loss(inputs, [labels, weights], 100)
    assert "attention_mask" not in packed and packed["use_cache"] is False
    assert torch.equal(packed["pixel_values"], inputs["pixel_values"][rows.order])  # images in the stream's order
    assert options["cu_seqlens"][-1] == rows.tokens <= labels.numel()
    keep = rows.source >= 0
    source = rows.source[keep]
    assert torch.equal(packed["input_ids"].reshape(-1)[keep], batch.input_ids.reshape(-1)[source])
    assert torch.equal(packed_labels.reshape(-1)[keep], labels.reshape(-1)[source])
    assert (packed_labels.reshape(-1)[~keep] == -100).all() and (packed_weights.reshape(-1)[~keep] == 0).all()
    # each sequence of the stream is one padded row, in rows.order
    for k, row in enumerate(rows.order):
        span = slice(options["cu_seqlens"][k], options["cu_seqlens"][k + 1])
        assert set((rows.source[span][rows.source[span] >= 0] // labels.shape[1]).tolist()) == {row}


def test_mrope_position_ids_are_each_sequences_own():
    """Qwen2-VL: [4, P, L] position ids, the text row restarting per sequence, the 3-D rows those of the padded
    batch's get_rope_index at the same tokens."""
    processor, model = build_family("qwen2-vl", seed=1)
    records, _ = load_records(synthetic.generate(os.path.join(os.environ.get("TMPDIR", "/tmp"), "qwen-pack"), 3,
                                                 seed=1))
    inputs = PairCollator(processor, gamma=5.0)(list(enumerate(records))).model_inputs()
    index = mrope_index(model)
    packed = pack_batch(inputs, 10 ** 6, index)
    positions = packed.inputs["position_ids"]
    assert positions.shape == (4, 1, packed.rows.tokens)
    keep = packed.rows.source >= 0
    assert torch.equal(positions[1:, 0][:, keep], index(inputs).reshape(3, -1)[:, packed.rows.source[keep]])
    starts = packed.cu_seqlens[:-1]
    assert (positions[0, 0, starts] == 0).all()
    assert mrope_index(tiny.build_model(tiny.build_processor())) is None


def test_check_packing_passes_and_refuses(dataset):
    records, _ = load_records(dataset)
    processor = tiny.build_processor()
    model = tiny.build_model(processor)
    inputs = PairCollator(processor, gamma=5.0)(list(enumerate(records[:2]))).model_inputs()
    assert check_packing(model, inputs) < 1e-5
    processor, gemma = build_family("gemma3", seed=1)
    inputs = PairCollator(processor, gamma=5.0)(list(enumerate(records[:2]))).model_inputs()
    if packed_model.known_unsupported("gemma3") is None:  # transformers < 5.23: gemma3 packs right
        assert check_packing(gemma, inputs) < 1e-5
        return
    with pytest.raises(UnsupportedModelError, match="Gemma3ForConditionalGeneration: its bidirectional image-token "
                                                    "mask .* Train without packing"):
        check_packing(gemma, inputs)
    # the comparison itself catches it too: the longest sequence placed after the shortest attends to its future
    known = packed_model.KNOWN_UNSUPPORTED.pop("gemma3")
    try:
        with pytest.raises(UnsupportedModelError, match="packed into rows, its sequences' logits differ"):
            check_packing(gemma, inputs)
    finally:
        packed_model.KNOWN_UNSUPPORTED["gemma3"] = known


def _losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["step"] > 0]


@pytest.mark.parametrize("fused_linear", [False, True])
def test_ddpo_packed_run_equals_the_padded_run(dataset, tmp_path, fused_linear):
    runs = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        train(TrainConfig(data=dataset, output_dir=str(out), max_steps=3, batch_size=4, eval_every=3, save_every=3,
                          eval_fraction=0.25, sft_weight=1.0, sft_steps=2, progress=False, device="cpu",
                          hallucination_eval=False, fused_linear=fused_linear, packing=packing,
                          max_tokens_per_row=100 if packing else None))
        runs[packing] = _losses(out)
    for padded, packed in zip(runs[False], runs[True]):
        for name in ("loss", "margin", "grad_norm", "eval_margin"):
            if name in padded:
                assert packed[name] == pytest.approx(padded[name], rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_packed_run_equals_the_padded_run(dataset, tmp_path, loss_type):
    base = dict(data=dataset, judge="scene", max_steps=2, num_generations=3, prompts_per_step=4, max_new_tokens=10,
                micro_batch=5, eval_fraction=0.1, eval_every=2, save_every=2, hallucination_eval=False, sft_steps=60,
                progress=False, device="cpu", lr=1e-3, loss_type=loss_type, updates_per_rollout=2)
    runs = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        train_grpo(GRPOConfig(**base, output_dir=str(out), packing=packing,
                              max_tokens_per_row=64 if packing else None))
        runs[packing] = _losses(out)
    for padded, packed in zip(runs[False], runs[True]):
        assert padded["reward_std"] > 0  # the advantages are not all zero: the loss has a gradient to compare
        for name in ("loss", "kl", "clip_ratio", "grad_norm", "reward"):
            assert packed[name] == pytest.approx(padded[name], rel=1e-4, abs=1e-5), name


def test_cli_flags():
    cfg = config_from_args(build_parser().parse_args(["--packing", "--max-tokens-per-row", "512"]))
    assert cfg.packing and cfg.max_tokens_per_row == 512
    cfg = grpo_config(grpo_parser().parse_args(["--packing", "--max-tokens-per-row", "256"]))
    assert cfg.packing and cfg.max_tokens_per_row == 256
    assert config_from_args(build_parser().parse_args(["--packing"])).max_tokens_per_row is None
    with pytest.raises(ValueError, match="max_tokens_per_row must be a positive int or None"):
        GRPOConfig(judge="scene", packing=True, max_tokens_per_row=0).check()
    for config in (GRPOConfig(judge="scene", max_tokens_per_row=64), TrainConfig(max_tokens_per_row=64)):
        with pytest.raises(ValueError, match="max_tokens_per_row=64 applies to packed batches only"):
            config.check() if isinstance(config, GRPOConfig) else train(config)
