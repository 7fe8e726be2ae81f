"""The family matrix: every tiny family of rlhfv_train/models/tiny_families.py (real transformers model and processor
classes, random weights, built in code, saved to a folder and loaded back as a user's --model) through
(a) the fused-linear route vs log_softmax of the model's own .logits on a collated preference batch (every processor
    tensor passed), (b) 3 DDPO steps (after one SFT warm-up step on the chosen half) on the logits path and on
    --fused-linear: step-1 loss ln 2, the same losses,
(c) 2 GRPO steps with the scene judge, (d) generation and the hallucination evaluation, (e) 2 DDPO steps with LoRA
    adapters on every linear layer but lm_head, on --fused-linear: step-1 loss ln 2, only the adapters train.
One model per family is shared by its five checks. docs/models.md's table comes from this matrix."""
import json
import math
import os

import pytest
import torch
import transformers
from packaging.version import Version

import rlhfv_kernels as rk
from rlhfv_kernels import reference
from rlhfv_train.data import load_records, PairCollator, synthetic
from rlhfv_train.eval import GenerationSettings, evaluate_hallucination
from rlhfv_train.grpo import GRPOConfig, train_grpo
from rlhfv_train.models import UnsupportedModelError, check_fused_linear, hidden_and_head, load_processor_and_model
from rlhfv_train.models.tiny_families import FAMILIES, build_family
from rlhfv_train.models.packed_model import known_unsupported
from rlhfv_train.ddpo import TrainConfig, train

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """(records with images, the same records without them) as data files."""
    folder = tmp_path_factory.mktemp("scenes")
    with_images = synthetic.generate(str(folder), 12, seed=2)
    text_only = folder / "text.jsonl"
    with open(with_images) as src, open(text_only, "w") as dst:
        for line in src:
            record = json.loads(line)
            record.pop("image", None)
            dst.write(json.dumps(record) + "\n")
    return {"image-text": with_images, "text": str(text_only)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, scenes, tmp_path_factory):
    """(name, saved folder, data file) of one family."""
    name = request.param
    for needed in FAMILIES[name].needs:
        pytest.importorskip(needed, reason=f"the {name} processor needs {needed}")
    processor, model = build_family(name, seed=1)
    folder = tmp_path_factory.mktemp(name.replace(".", "_"))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return name, str(folder), scenes[FAMILIES[name].kind]


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_fused_linear_route_equals_the_models_own_logits(family):
    name, folder, data = family
    processor, model = load_processor_and_model(folder, 0)
    assert type(model).__name__ == FAMILIES[name].model_class
    records, _ = load_records(data)
    batch = PairCollator(processor, gamma=5.0)(list(enumerate(records[:3])))
    inputs = batch.model_inputs()
    labels, _ = batch.next_token_targets()
    assert check_fused_linear(model.eval(), inputs) < 1e-3
    with torch.no_grad():
        own = reference.token_logprobs(model(**inputs).logits.double(), labels)
        hidden, head = hidden_and_head(model, inputs)
        ours = rk.linear_token_logprobs(hidden, head.weight, labels, **head.options())
    assert bool((labels != -100).any())
    torch.testing.assert_close(ours.double(), own, rtol=0, atol=1e-4)


def test_three_ddpo_steps_on_both_paths(family, tmp_path):
    name, folder, data = family
    losses = {}
    for fused in (False, True):
        out = tmp_path / f"fused-{fused}"
        summary = train(TrainConfig(data=data, model=folder, output_dir=str(out), max_steps=3, batch_size=2,
                                    eval_fraction=0.25, eval_every=3, save_every=3, fused_linear=fused, sft_steps=1,
                                    hallucination_eval=False, progress=False, device="cpu", lr=1e-3))
        assert summary["step"] == 3
        losses[fused] = [row["loss"] for row in _metrics(out) if row["step"] > 0]
    assert losses[False][0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


# models/packed_model.check_packing refuses these on the installed transformers (docs/models.md's table gives 5.25's):
# mllama, gemma3 from 5.23 (KNOWN_UNSUPPORTED), paligemma before 5.24 (its prefix mask lets packed sequences see each
# other there: the comparison finds it)
PACKING_REFUSED = ({"mllama"} | ({"gemma3"} if known_unsupported("gemma3") else set())
                   | ({"paligemma"} if Version(transformers.__version__) < Version("5.24") else set()))


def test_packed_ddpo_steps_equal_the_padded_ones_or_are_refused(family, tmp_path):
    """--packing (rows of 48 tokens: several sequences per row, tails) gives the padded run's losses; a family that
    lets packed sequences see each other is refused before training."""
    name, folder, data = family
    runs = {}
    for packing in (False, True):
        config = TrainConfig(data=data, model=folder, output_dir=str(tmp_path / f"packing-{packing}"), max_steps=3,
                             batch_size=2, eval_fraction=0.25, eval_every=3, save_every=3, sft_steps=1,
                             packing=packing, max_tokens_per_row=48 if packing else None, hallucination_eval=False,
                             progress=False, device="cpu", lr=1e-3)
        if packing and name in PACKING_REFUSED:
            with pytest.raises(UnsupportedModelError, match="Train without packing"):
                train(config)
            return
        train(config)
        runs[packing] = [row for row in _metrics(config.output_dir) if row["step"] > 0]
    for padded, packed in zip(runs[False], runs[True]):
        assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-5)
        assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)


def test_two_grpo_steps(family, tmp_path):
    name, folder, data = family
    summary = train_grpo(GRPOConfig(data=data, model=folder, judge="scene", output_dir=str(tmp_path), max_steps=2,
                                    num_generations=2, prompts_per_step=2, max_new_tokens=6, micro_batch=3,
                                    eval_fraction=0.25, eval_every=2, save_every=2, eval_max_new_tokens=4,
                                    sft_steps=0, progress=False, device="cpu", lr=1e-3))
    assert summary["step"] == 2
    rows = [row for row in _metrics(tmp_path) if row["step"] > 0]
    assert len(rows) == 2 and all(math.isfinite(row["loss"]) for row in rows)


def test_generation_and_hallucination_evaluation(family):
    name, folder, data = family
    processor, model = load_processor_and_model(folder, 0)
    records, _ = load_records(data)
    rates, answers = evaluate_hallucination(model, processor, records[:3],
                                            settings=GenerationSettings(max_new_tokens=5, batch_size=2))
    assert len(answers) == 3 and all(len(a) == 1 for a in answers)
    assert set(rates) >= {"chair_s", "chair_i", "recall", "mentioned"}


def test_lora_ddpo_steps_on_the_fused_linear_route(family, tmp_path):
    pytest.importorskip("peft")
    name, folder, data = family
    summary = train(TrainConfig(data=data, model=folder, output_dir=str(tmp_path), max_steps=2, batch_size=2,
                                eval_fraction=0.25, eval_every=2, save_every=2, fused_linear=True, lora_r=4,
                                hallucination_eval=False, progress=False, device="cpu", lr=1e-3))
    assert [row["loss"] for row in _metrics(tmp_path) if row["step"] > 0][0] == pytest.approx(math.log(2), abs=1e-6)
    trained = [n for n, p in summary["model"].named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
