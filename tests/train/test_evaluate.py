"""The hallucination metric (rlhfv_train.eval), the SFT stage in the trainer, and the ablation pipeline."""
import json
import os
import random

import pytest
import torch

from rlhfv_train import eval as evaluate
from rlhfv_train.data import DataError, load_records, synthetic
from rlhfv_train.models import tiny
from rlhfv_train.eval import GenerationSettings, generate_answers, hallucination_rates
from rlhfv_train.ddpo import TrainConfig, train

pytest.importorskip("PIL")

RED_LEFT, BLUE_RIGHT = ("red", "circle", "left"), ("blue", "square", "right")


def test_rates_count_responses_mentions_and_recall_by_hand():
    truths = [[RED_LEFT, BLUE_RIGHT], [RED_LEFT], [BLUE_RIGHT], [RED_LEFT]]
    answers = [
        "there is a red circle on the left and a blue square on the right .",          # exact
        "there is a orange circle on the left and a green triangle in the middle .",   # 2 wrong of 2
        "there is a blue square on the right and a blue square on the right .",        # a repeat counts once
        "nothing to see",                                                               # mentions nothing
    ]
    rates = hallucination_rates(answers, truths)
    assert rates["chair_s"] == pytest.approx(1 / 4)
    assert rates["chair_i"] == pytest.approx(2 / 5)      # 2 hallucinated of 2 + 2 + 1 + 0 mentioned
    assert rates["recall"] == pytest.approx(3 / 5)       # 2 + 0 + 1 + 0 found of 2 + 1 + 1 + 1 present
    assert rates["mentioned"] == pytest.approx(5 / 4) and rates["answers"] == 4
    with pytest.raises(ValueError, match="2 answers for 1"):
        hallucination_rates(answers[:2], truths[:1])


def test_user_parser_and_json_style_truths():
    rates = hallucination_rates(["cat, dog", "cat"], [[["cat"], ["sofa"]], [["cat"]]],
                                parser=lambda text: [[w.strip()] for w in text.split(",")])
    assert (rates["chair_s"], rates["chair_i"], rates["recall"]) == (0.5, pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert evaluate.load_parser("rlhfv_train.data.synthetic:parse_description") is synthetic.parse_description
    for spec, message in (("nocolon", "expected module:function"), ("no_such_module_x:f", "cannot load"),
                          ("os:no_such_function", "cannot load"), ("os:sep", "not callable")):
        with pytest.raises(ValueError, match=message):
            evaluate.load_parser(spec)


def test_scene_descriptions_parse_back_and_rejected_answers_are_wrong():
    rng = random.Random(11)
    for _ in range(300):
        example = synthetic.make_example(rng)
        objects = [tuple(o) for o in example["objects"]]
        assert synthetic.parse_description(example["chosen"]) == objects
        wrong = synthetic.parse_description(example["rejected"])
        assert wrong != objects and len(set(wrong)) == len(wrong)
        assert example["reward_margin"] == len(set(wrong) - set(objects)) >= 1
    assert synthetic.parse_description("a pink circle on the left and a red blob on the right") == []


def test_partial_corrections_keep_one_of_two_errors(tmp_path):
    rng = random.Random(12)
    partly = 0
    for _ in range(400):
        example = synthetic.make_example(rng, partial=1.0)
        truth = {tuple(o) for o in example["objects"]}
        chosen = set(synthetic.parse_description(example["chosen"]))
        rejected = set(synthetic.parse_description(example["rejected"]))
        assert chosen != rejected
        assert example["reward_margin"] == len(rejected - truth) - len(chosen - truth)
        if chosen != truth:  # the chosen answer kept the first error: exactly one wrong object
            partly += 1
            assert len(chosen - truth) == 1
    assert 80 < partly < 240  # 40% of answers have two errors; each is partly corrected here
    with pytest.raises(ValueError, match="partial must be in"):
        synthetic.generate(str(tmp_path), 2, partial=1.5)


def test_objects_field_is_loaded_and_checked(tmp_path, dataset):
    records, _ = load_records(dataset)
    assert all(isinstance(o, tuple) and len(o) == 3 for r in records for o in r.objects)
    base = {"question": "q", "chosen": "a", "rejected": "b"}
    for objects, message in (("red", "objects must be a list"), ([{"a": 1}], "objects entries must be")):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({**base, "objects": objects}) + "\n")
        with pytest.raises(DataError, match=message):
            load_records(str(path))


def test_generation_is_reproducible_and_leaves_the_caller_state_alone(dataset):
    records, _ = load_records(dataset)
    processor = tiny.build_processor()
    model = tiny.build_model(processor, seed=1).train()
    processor.tokenizer.padding_side = "right"
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    sampled = GenerationSettings(max_new_tokens=6, do_sample=True, num_samples=3, temperature=1.5, batch_size=3, seed=4)
    first = generate_answers(model, processor, records[:5], sampled)
    assert torch.equal(torch.rand(3), expected_next)  # the global random state is untouched
    assert model.training and processor.tokenizer.padding_side == "right"
    assert [len(a) for a in first] == [3] * 5
    assert generate_answers(model, processor, records[:5], sampled) == first
    greedy = generate_answers(model, processor, records[:5], GenerationSettings(max_new_tokens=6, batch_size=2))
    assert greedy == generate_answers(model, processor, records[:5], GenerationSettings(max_new_tokens=6))
    for bad, message in ((dict(num_samples=2), "needs sampling"), (dict(max_new_tokens=0), ">= 1"),
                         (dict(do_sample=True, temperature=0.0), "temperature > 0")):
        with pytest.raises(ValueError, match=message):
            GenerationSettings(**bad).check()


class _Oracle(torch.nn.Module):
    """A 'model' whose generate() answers with the given texts, one per row in order (tests the decoding path)."""

    def __init__(self, tokenizer, texts):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.texts = tokenizer, list(texts)

    def generate(self, input_ids, **kwargs):
        rows = []
        for _ in range(input_ids.shape[0]):
            ids = self.tokenizer(self.texts.pop(0) + " </s>", add_special_tokens=False)["input_ids"]
            rows.append(ids + [self.tokenizer.pad_token_id] * (24 - len(ids)))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_a_model_that_says_the_truth_scores_perfectly_and_one_that_lies_does_not(dataset):
    records, _ = load_records(dataset)
    processor = tiny.build_processor()
    truth = [synthetic.describe(r.objects) for r in records[:7]]
    rates, answers = evaluate.evaluate_hallucination(_Oracle(processor.tokenizer, truth), processor, records[:7],
                                                     settings=GenerationSettings(batch_size=3))
    assert [a[0] for a in answers] == truth
    assert (rates["chair_s"], rates["chair_i"], rates["recall"]) == (0.0, 0.0, 1.0)
    lies = [r.rejected for r in records[:7]]
    rates, _ = evaluate.evaluate_hallucination(_Oracle(processor.tokenizer, lies), processor, records[:7])
    assert rates["chair_s"] == 1.0 and rates["chair_i"] > 0


def _small(tmp_path, dataset, **overrides):
    values = dict(data=dataset, output_dir=str(tmp_path), max_steps=4, batch_size=4, eval_every=2, save_every=2,
                  eval_fraction=0.25, sft_weight=1.0, sft_steps=3, progress=False, lr=1e-4, device="cpu",
                  eval_max_new_tokens=8)
    values.update(overrides)
    return TrainConfig(**values)


def test_warm_up_then_preference_training_reports_rates_before_and_after(tmp_path, dataset):
    summary = train(_small(tmp_path, dataset))
    rows = [json.loads(line) for line in open(summary["metrics_path"])]
    assert rows[0]["step"] == 0 and "loss" not in rows[0] and rows[0]["sft_loss"] > 0
    for row in (rows[0], rows[2], rows[4]):
        assert {"chair_s", "chair_i", "recall", "mentioned", "eval_accuracy"} <= set(row)
    assert summary["start_metrics"] == rows[0] and summary["metrics"] == rows[-1]
    assert os.path.isfile(tmp_path / "sft.pt")
    # The warm-up moved the weights away from the seeded initialisation, and the reference scores came after it.
    fresh = tiny.build_model(tiny.build_processor(), seed=0).state_dict()
    warmed = torch.load(tmp_path / "sft.pt", weights_only=False)["model"]
    assert any(not torch.equal(fresh[k], warmed[k]) for k in fresh)
    # --no-hallucination-eval and records without objects both skip the generation.
    quiet = train(_small(tmp_path / "quiet", dataset, hallucination_eval=False, sft_steps=0, max_steps=1))
    assert "chair_s" not in quiet["metrics"] and "eval_accuracy" in quiet["metrics"]


def test_resume_after_a_warm_up_ends_with_the_same_weights(tmp_path, dataset):
    straight = train(_small(tmp_path / "a", dataset))["model"].state_dict()
    assert train(_small(tmp_path / "b", dataset, stop_after=2))["stopped"]
    resumed = train(_small(tmp_path / "b", dataset, resume=True))["model"].state_dict()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def test_init_weights_start_from_a_checkpoint(tmp_path, dataset):
    first = train(_small(tmp_path / "a", dataset, max_steps=1))
    again = train(_small(tmp_path / "b", dataset, max_steps=1, sft_steps=0, init_weights=first["checkpoint"]))
    assert again["start_metrics"]["chair_s"] == pytest.approx(first["metrics"]["chair_s"])
    with pytest.raises(FileNotFoundError, match="--init-weights"):
        train(_small(tmp_path / "c", dataset, init_weights=str(tmp_path / "missing.pt")))
    torch.save({"model": {"nope": torch.zeros(1)}}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not fit the model"):
        train(_small(tmp_path / "d", dataset, init_weights=str(tmp_path / "wrong.pt")))


def test_cli_on_a_checkpoint_and_on_a_saved_hugging_face_model(tmp_path, dataset, capsys):
    summary = train(_small(tmp_path / "run", dataset, max_steps=1))
    out = tmp_path / "rates.json"
    assert evaluate.main(["--checkpoint", summary["checkpoint"], "--json", str(out), "--no-progress",
                          "--max-new-tokens", "8"]) == 0
    result = json.loads(out.read_text())
    assert len(result["answers"]) == 10  # the run's held-out records: 25% of 40
    assert result["rates"]["chair_s"] == pytest.approx(summary["metrics"]["chair_s"])
    assert "chair_s" in capsys.readouterr().out
    # A run on the default (generated) data names no --data in its config: the checkpoint's data_path is used.
    state = torch.load(summary["checkpoint"], weights_only=False)
    state["config"]["data"] = None
    torch.save(state, tmp_path / "default-data.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "default-data.pt"), "--limit", "2", "--no-progress",
                          "--max-new-tokens", "4"]) == 0
    # Any local image-text-to-text folder, with a parser named on the command line and sampled answers.
    processor = tiny.build_processor()
    tiny.build_model(processor).save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    assert evaluate.main(["--model", str(tmp_path / "hf"), "--data", dataset, "--limit", "4", "--sample",
                          "--num-samples", "2", "--parser", "rlhfv_train.data.synthetic:parse_description",
                          "--max-new-tokens", "6", "--no-progress", "--json", str(out)]) == 0
    assert [len(a["answers"]) for a in json.loads(out.read_text())["answers"]] == [2] * 4


def test_cli_errors_are_one_line(tmp_path, capsys):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"question": "q", "chosen": "a", "rejected": "b"}) + "\n")
    processor = tiny.build_processor()
    tiny.build_model(processor).save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    cases = [([], "give --checkpoint"), (["--checkpoint", str(tmp_path / "nope.pt")], "no such file"),
             (["--model", str(tmp_path / "hf"), "--data", str(plain)], "have no 'objects'"),
             (["--model", str(tmp_path / "hf"), "--data", str(plain), "--split", "heldout"], "needs --checkpoint"),
             (["--model", str(tmp_path / "hf"), "--num-samples", "3"], "needs sampling")]
    capsys.readouterr()  # saving the model printed a progress bar
    for argv, message in cases:
        assert evaluate.main(argv + ["--no-progress"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], errors  # (transformers may draw a loading bar too)


def test_ablation_pipeline_runs_every_method(tmp_path, capsys):
    from experiments import ablation
    out = tmp_path / "res"
    assert ablation.main(["--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--no-progress",
                          "--steps", "2", "--sft-steps", "2", "--examples", "40"]) == 0
    result = json.loads((tmp_path / "res.json").read_text())
    rows = {(r["method"], r["sft_weight"]) for r in result["summary"]}
    expected = {(m, w) for m in ablation.METHODS for w in (0.0, 1.0)} | {(ablation.CONTROL, None),
                                                                         ("start (sft warm-up)", None)}
    assert rows == expected
    assert all(0 <= r["chair_s"][0] <= 1 for r in result["summary"])
    assert "| dpo | 0 |" in (tmp_path / "res.md").read_text() and os.path.getsize(tmp_path / "res.png") > 1000
    for bad in (["--methods", "dpo,nope"], ["--batch-size", "0"], ["--samples", "0"], ["--eval-fraction", "1"],
                ["--sft-steps", "-1"]):
        assert ablation.main([*bad, "--work-dir", str(tmp_path / "w2"), "--quick"]) == 2
    assert "--eval-fraction must be between 0 and 1" in capsys.readouterr().err


def test_corrections_fix_attributes_and_delete_invented_objects():
    truth = [RED_LEFT, BLUE_RIGHT]
    mentioned = [("orange", "circle", "left"), ("green", "diamond", "middle"), BLUE_RIGHT, ("red", "square", "left")]
    assert synthetic.correct(mentioned, truth) == [RED_LEFT, BLUE_RIGHT]  # the repeated left mention merges
    assert synthetic.correct([("green", "diamond", "middle")], truth) == []
    assert synthetic.correct([BLUE_RIGHT], truth) == [BLUE_RIGHT]  # an omission is not corrected


def _answers_from_rejected(model, processor, records, settings=None, **kwargs):
    """Stands in for generate_answers: every 'sample' is the record's rejected answer (always correctable)."""
    return [[r.rejected] * (settings.num_samples if settings else 1) for r in records]


def test_on_policy_pairs_and_their_ablation_pipeline(tmp_path, dataset, monkeypatch):
    from experiments import ablation
    records, _ = load_records(dataset)
    pairs = ablation.on_policy_pairs(records, [[r.rejected, r.chosen, "there is in in ."] for r in records])
    assert len(pairs) == len(records)  # only the rejected answers have something to correct
    for pair, record in zip(pairs, records):
        assert pair["rejected"] == record.rejected and pair["chosen"] != pair["rejected"]
        fixed = synthetic.parse_description(pair["chosen"])
        assert set(fixed) <= set(record.objects)
        assert pair["reward_margin"] == len(set(synthetic.parse_description(record.rejected)) - set(record.objects))
    monkeypatch.setattr(evaluate, "generate_answers", _answers_from_rejected)
    work = tmp_path / "work"
    assert ablation.main(["--quick", "--pairs", "on-policy", "--work-dir", str(work), "--out", str(tmp_path / "r"),
                          "--no-progress", "--steps", "1", "--sft-steps", "1", "--examples", "40",
                          "--methods", "ddpo-paper,sft-more", "--sft-weights", "1"]) == 0
    held = [json.loads(line) for line in open(work / "seed0" / "heldout.jsonl")]
    assert len(held) == 8 and all(row["objects"] for row in held)
    config = torch.load(work / "seed0" / "ddpo-paper-sft1" / "checkpoint.pt", weights_only=False)["config"]
    assert config["data"].endswith("pairs.jsonl") and config["eval_data"].endswith("heldout.jsonl")
    rows = {r["method"] for r in json.loads((tmp_path / "r.json").read_text())["summary"]}
    assert rows == {"ddpo-paper", "sft-more", "start (sft warm-up)"}


def test_stacked_scenes_have_long_answers_and_column_wise_corrections(tmp_path):
    rng = random.Random(21)
    for _ in range(200):
        example = synthetic.make_example(rng, per_side=2)
        objects = [tuple(o) for o in example["objects"]]
        assert 3 <= len(objects) <= 6 and len(set(objects)) == len(objects)
        assert all(sum(o[2] == side for o in objects) <= 2 for side in synthetic.SIDES)
        assert synthetic.parse_description(example["chosen"]) == objects
        assert example["rejected"] != example["chosen"] and example["reward_margin"] >= 1
    column = [("red", "circle", "left"), ("blue", "square", "left")]
    said = [("orange", "circle", "left"), ("blue", "square", "left"), ("green", "diamond", "left")]
    assert synthetic.correct(said, column) == column  # the k-th mention in a column is the k-th object there
    path = synthetic.generate(str(tmp_path / "stacked"), 3, per_side=2)
    assert len(load_records(path)[0]) == 3
    with pytest.raises(ValueError, match="per_side must be 1 or 2"):
        synthetic.generate(str(tmp_path), 2, per_side=3)
