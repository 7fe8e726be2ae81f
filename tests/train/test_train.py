"""The trainer on the embedded tiny LLaVA and synthetic data: batching, training, reference cache, exact resume."""
import json
import math
import os

import pytest
import torch
from torchrun_launch import run_under_torchrun

from rlhfv_train.data import IGNORE_INDEX, load_records, PairCollator, synthetic
from rlhfv_train.ddpo import reference_scores as refcache
from rlhfv_train.models import tiny
from rlhfv_train.ddpo import build_parser, config_from_args
from rlhfv_train.ddpo import TrainConfig, train

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    return synthetic.generate(str(folder), 48, seed=3)


def small_config(output_dir, dataset, **overrides):
    values = dict(data=dataset, output_dir=str(output_dir), max_steps=6, batch_size=4, eval_every=3, save_every=3,
                  eval_fraction=0.25, sft_weight=1.0, progress=False, lr=2e-3, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def test_collator_masks_prompt_and_weights_corrections(dataset):
    records, _ = load_records(dataset)
    processor = tiny.build_processor()
    batch = PairCollator(processor, gamma=5.0)(list(enumerate(records[:4])))
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert batch.input_ids.shape[0] == 8 and batch.inputs["pixel_values"].shape[0] == 8
    for row in range(8):
        labelled = batch.labels[row] != IGNORE_INDEX
        # Image and prompt tokens are never labelled; answer tokens are, and carry weight >= 1.
        assert not labelled[batch.input_ids[row] == image_id].any()
        assert torch.all(batch.token_weights[row][~labelled] == 0)
        assert torch.all(batch.token_weights[row][labelled] >= 1)
        record = records[row % 4]
        answer = record.chosen if row < 4 else record.rejected
        words = tok.convert_ids_to_tokens(batch.input_ids[row][labelled].tolist())
        assert " ".join(words) == answer + " </s>"
    # The hallucinated word of a replacement is up-weighted on both sides.
    for i in range(4):
        c_words = records[i].chosen.split()
        r_words = records[i].rejected.split()
        if len(c_words) == len(r_words):
            diff = [k for k, (a, b) in enumerate(zip(c_words, r_words)) if a != b]
            c_weights = batch.token_weights[i][batch.labels[i] != IGNORE_INDEX]
            assert all(c_weights[k] == 5.0 for k in diff)


def test_training_improves_and_writes_outputs(tmp_path, dataset):
    summary = train(small_config(tmp_path, dataset, max_steps=30, eval_every=15, save_every=15))
    rows = [json.loads(line) for line in open(summary["metrics_path"])]
    assert [r["step"] for r in rows] == list(range(31))  # step 0: the starting point, evaluated before training
    rows = rows[1:]
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5])
    assert "eval_accuracy" in rows[14] and "eval_accuracy" in rows[29]
    assert os.path.getsize(summary["plot"]) > 1000 and os.path.isfile(summary["checkpoint"])


def test_resume_drops_a_torn_last_metrics_line_and_names_a_damaged_one(tmp_path, dataset, capsys):
    """A kill during a metrics append leaves a torn last line: --resume drops it and goes on; a damaged line before
    the last is a one-line error naming the file and the line."""
    train(small_config(tmp_path, dataset, stop_after=3))
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 4, "loss": 0.6')  # torn
    resumed = train(small_config(tmp_path, dataset, resume=True))
    assert resumed["step"] == 6 and "dropped the torn last line" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(metrics)] == [0, 1, 2, 3, 4, 5, 6]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a metrics row"):
        train(small_config(tmp_path, dataset, resume=True, max_steps=8))


def test_reference_scores_are_cached(tmp_path, dataset, monkeypatch):
    train(small_config(tmp_path, dataset, max_steps=1))
    cached = os.listdir(tmp_path / "ref_cache")
    assert len(cached) == 1

    def fail(*args, **kwargs):
        raise AssertionError("reference scores recomputed despite the cache")

    monkeypatch.setattr(refcache, "score_pairs", fail)
    train(small_config(tmp_path, dataset, max_steps=1, overwrite=True))  # --overwrite keeps the reference cache
    # A different gamma changes the token weights, hence the key.
    monkeypatch.undo()
    train(small_config(tmp_path, dataset, max_steps=1, gamma=2.0, overwrite=True))
    assert len(os.listdir(tmp_path / "ref_cache")) == 2
    # So does the prompt format (--no-chat-template changes the scored sequences of a model with a template).
    train(small_config(tmp_path, dataset, max_steps=1, gamma=2.0, chat_template=False, overwrite=True))
    assert len(os.listdir(tmp_path / "ref_cache")) == 3


def test_text_only_data_with_a_local_causal_lm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = tiny.build_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"question": "what do you see ?", "chosen": f"a red {s}",
                                          "rejected": f"a blue {s}"}) for s in synthetic.SHAPES * 4) + "\n")
    summary = train(TrainConfig(data=str(data), model=str(tmp_path / "lm"), output_dir=str(tmp_path / "out"),
                                max_steps=2, batch_size=4, progress=False, device="cpu"))
    assert summary["step"] == 2


def test_cli_presets_and_overrides():
    parse = lambda *a: config_from_args(build_parser().parse_args(list(a)))  # noqa: E731
    assert (parse("--preset", "authors").gamma, parse("--preset", "authors").beta) == (1.1, 0.1)
    assert parse("--preset", "authors").mode == "sum"
    assert parse("--preset", "paper", "--beta", "0.2").beta == 0.2
    assert parse().sft_weight == 1.0 and parse("--model", "x").sft_weight == 0.0
    assert parse("--no-inplace-backward").inplace_backward is False


@pytest.mark.parametrize("option, rtol, atol", [("fused_linear", 1e-4, 1e-5), ("grad_checkpointing", 1e-5, 1e-6)])
def test_an_option_that_changes_how_not_what_gives_the_same_run(tmp_path, dataset, option, rtol, atol):
    """--fused-linear (hidden states + lm_head weight) and --grad-checkpointing (recomputed activations) end where
    the plain run ends."""
    plain = train(small_config(tmp_path / "a", dataset, max_steps=2))["model"].state_dict()
    other = train(small_config(tmp_path / "b", dataset, max_steps=2, **{option: True}))["model"].state_dict()
    for name in plain:
        torch.testing.assert_close(other[name], plain[name], rtol=rtol, atol=atol, msg=name)


def _metric_rows(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_fused_linear_trains_the_same_model_on_families_that_transform_their_logits(tmp_path, family):
    """Gemma 2's soft cap, Cohere's logit scale and Granite's logits scaling reach the fused-linear loss: 3 steps on
    both paths give step-1 loss ln 2, the same losses and the same weights."""
    from test_model_adapter import build
    tok = tiny.build_tokenizer()
    model = build(family)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"question": "what do you see ?", "chosen": f"a red {s} on the left",
                                          "rejected": f"a blue {s} on the left"}) for s in synthetic.SHAPES * 4))
    runs = {}
    for fused in (False, True):
        out = tmp_path / f"out-{fused}"
        summary = train(TrainConfig(data=str(data), model=str(tmp_path / "lm"), output_dir=str(out), max_steps=3,
                                    batch_size=4, progress=False, device="cpu", lr=1e-3, fused_linear=fused,
                                    hallucination_eval=False))
        runs[fused] = ([r["loss"] for r in _metric_rows(out) if r["step"] > 0], summary["model"].state_dict())
    assert runs[False][0][0] == pytest.approx(math.log(2), abs=1e-6)
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-5)
    # AdamW moves a weight whose gradient is ~0 by up to ~lr in either direction, so rounding-level gradient
    # differences can show there; a dropped transform moves the losses above by orders of magnitude more.
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("parallel,route", [
    ("ddp", []), ("ddp", ["--fused-linear"]),
    ("fsdp", ["--fused-linear", "--lora-r", "4", "--lora-target", "q_proj,v_proj,lm_head"]),
    ("tp", ["--fused-linear"])],
    ids=["ddp-logits", "ddp-fused-linear", "fsdp-fused-linear-lora-with-head", "tensor-parallel-fused-linear"])
def test_two_gloo_processes_match_one_process(tmp_path, dataset, parallel, route):
    """torchrun with 2 CPU processes (gloo; DDP on the logits route and on the fused-linear route, FSDP2 with the
    fused-linear route and LoRA adapters, one on lm_head), 2 pairs each, ends where one process with 4 pairs per batch
    does; two micro-batches per step also exercise the skipped gradient sync. Under --tensor-parallel (transformers'
    own plan for the tiny LLaVA's language model, the lm_head vocab-parallel) both processes take all 4 pairs, and a
    resumed run continues exactly. (tests/train/test_scale_out.py checks every wrapper layout's gradients.)"""
    import subprocess
    import sys
    common = ["--data", dataset, "--max-steps", "3", "--sft-weight", "0", "--sft-steps", "2", "--eval-fraction", "0.25",
              "--save-every", "3", "--no-progress", "--lr", "5e-4", "--grad-accum", "2", "--device", "cpu", *route]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = {"fsdp": ["--fsdp", "--batch-size", "2"], "tp": ["--tensor-parallel", "--batch-size", "4"]}.get(
        parallel, ["--batch-size", "2"])

    def launch(*extra):
        return run_under_torchrun(["-m", "rlhfv_train", "--output-dir", str(tmp_path / "ddp"), *flags, *common, *extra])
    ddp = launch()
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "rlhfv_train", "--output-dir", str(tmp_path / "one"),
                             "--batch-size", "4", *common], capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    # The warm-up ran in process 0 alone, on the global batch: the same weights as one process, bit for bit.
    sft = [torch.load(tmp_path / run / "sft.pt", weights_only=False)["model"] for run in ("ddp", "one")]
    assert all(torch.equal(sft[0][name], sft[1][name]) for name in sft[0])
    a = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    # Same batches, same averaged gradients: only reduction-order rounding differs, which Adam's g/sqrt(v) can
    # magnify to ~1e-5 on parameters whose gradient is ~0 (seen: 5 of 253728 elements above 1e-5).
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4, msg=name)
    rows = {run: [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("ddp", "one")}
    assert [r["step"] for r in rows["ddp"]] == [0, 1, 2, 3]
    assert "chair_s" in rows["ddp"][-1]  # generation ran (under FSDP2 on gathered parameters)
    for mine, theirs in zip(rows["ddp"], rows["one"]):
        # at step 1 the policy is the reference: its margins are rounding noise about 0, and their signs (accuracy)
        # any that another summation order gives
        for key in ("loss", "margin") + (("accuracy",) if mine["step"] > 1 else ()) if mine["step"] else ():
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)
    if parallel == "tp":  # the checkpoint (gathered from the shards) resumes the sharded run exactly
        resumed = launch("--resume", "--max-steps", "4")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        onward = subprocess.run([sys.executable, "-m", "rlhfv_train", "--output-dir", str(tmp_path / "one"),
                                 "--batch-size", "4", *common, "--resume", "--max-steps", "4"], capture_output=True,
                                text=True, env=env, timeout=600)
        assert onward.returncode == 0, onward.stderr[-3000:]
        last = [json.loads(open(tmp_path / run / "metrics.jsonl").readlines()[-1]) for run in ("ddp", "one")]
        assert last[0]["step"] == last[1]["step"] == 4
        assert last[0]["loss"] == pytest.approx(last[1]["loss"], rel=1e-5, abs=1e-6)


def test_next_token_targets_shift_labels_and_weights(dataset):
    records, _ = load_records(dataset)
    batch = PairCollator(tiny.build_processor(), gamma=5.0)(list(enumerate(records[:2])))
    labels, weights = batch.next_token_targets()
    assert torch.equal(labels[:, :-1], batch.labels[:, 1:]) and torch.all(labels[:, -1] == IGNORE_INDEX)
    assert torch.equal(weights[:, :-1], batch.token_weights[:, 1:]) and torch.all(weights[:, -1] == 0)


def test_trainer_benchmark_runs(tmp_path):
    from benchmarks import trainer
    path = tmp_path / "t.json"
    for family in ("llava", "qwen2-vl", "gemma2"):
        assert trainer.main(["--family", family, "--vocab", "500", "--pairs", "2", "--repeats", "1", "--device",
                             "cpu", "--json", str(path)]) == 0
        data = json.loads(path.read_text())
        assert data["family"] == family
        assert [r["impl"] for r in data["results"]] == ["reference", "fused", "fused_inplace", "fused_linear"]
        assert all(r["step_median_ms"] > 0 and r["peak_extra_bytes"] > 0 for r in data["results"])
    # --check compares step speedups with a recorded run's: itself is never worse, a run twice as fast is.
    run = json.loads(path.read_text())
    for r in run["results"]:
        r["suspect"] = []
    assert trainer.check_against(run, run, 0.3) == 0
    faster = json.loads(path.read_text())
    for r in faster["results"][1:]:
        r["step_median_ms"] /= 2
    assert trainer.check_against(run, faster, 0.3) == 3
    other = {**run, "family": "llava"}
    with pytest.raises(SystemExit, match="no \\(case, impl\\) row"):
        trainer.check_against(other, run, 0.3)


def test_reward_margins_reach_the_loss(tmp_path, dataset):
    """Records with reward_margin: the batch carries them and MM-DPO scaling changes the run."""
    rows = [json.loads(line) for line in open(dataset)]
    folder = os.path.dirname(dataset)
    path = os.path.join(folder, "with_margin.jsonl")
    with open(path, "w") as f:
        for k, row in enumerate(rows):
            f.write(json.dumps({**row, "reward_margin": 0.25 * (k % 5)}) + "\n")
    records, _ = load_records(path)
    batch = PairCollator(tiny.build_processor(), gamma=5.0)(list(enumerate(records[:5])))
    assert batch.reward_margin.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    plain = train(small_config(tmp_path / "a", path, max_steps=2))["metrics"]
    scaled = train(small_config(tmp_path / "b", path, max_steps=2, drs_weight=2.0, drs_k=1.0))["metrics"]
    assert scaled["loss"] != plain["loss"]


def test_resume_without_a_checkpoint_says_so(tmp_path, dataset, capsys):
    train(small_config(tmp_path / "fresh", dataset, max_steps=1, resume=True))
    assert "--resume: no checkpoint at" in capsys.readouterr().out


def test_cli_errors_are_one_line_and_help_shows_defaults(tmp_path, dataset, capsys):
    from rlhfv_train.ddpo import build_parser, main
    assert main(["--data", str(dataset), "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0] and "no such folder" in err[0], err
    text = build_parser().format_help()
    assert "(default: runs/rlhfv)" in text and "(default: 0.002)" in text and "(default: 0.0)" in text


def test_resuming_a_finished_run_reports_its_last_metrics(tmp_path, dataset, capsys):
    first = train(small_config(tmp_path, dataset, max_steps=2))
    again = train(small_config(tmp_path, dataset, max_steps=2, resume=True))
    assert "already reached --max-steps 2" in capsys.readouterr().out
    assert again["step"] == 2 and again["metrics"]["loss"] == pytest.approx(first["metrics"]["loss"])
    assert len(open(again["metrics_path"]).readlines()) == 3  # steps 0, 1, 2: nothing appended


def test_tensor_parallel_refuses_what_it_cannot_run():
    """--tensor-parallel needs torchrun's processes, and is refused beside the options it has not been checked with
    (FSDP2, LoRA, packing), before any work; GRPO's prompts need not divide over the processes then (each takes all)."""
    from rlhfv_train.grpo import GRPOConfig
    with pytest.raises(ValueError, match="--tensor-parallel shards the model over torchrun's processes"):
        TrainConfig(tensor_parallel=True).check(1)
    for extra, flag in (({"fsdp": True}, "--fsdp"), ({"lora_r": 4}, "--lora-r"), ({"packing": True}, "--packing")):
        with pytest.raises(ValueError, match=f"--tensor-parallel with {flag} is not supported yet"):
            TrainConfig(tensor_parallel=True, **extra).check(2)
    with pytest.raises(ValueError, match="--backend eager would gather the whole logits"):
        TrainConfig(tensor_parallel=True, fused_linear=True, backend="eager").check(2)
    GRPOConfig(tensor_parallel=True, judge="scene", prompts_per_step=3).check(2)
    with pytest.raises(ValueError, match="must divide evenly over 2 processes"):
        GRPOConfig(judge="scene", prompts_per_step=3).check(2)
