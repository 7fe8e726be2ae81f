"""experiments/prior_study.py (issue 46): the plan's statistics on hand-checked numbers, its refusals, and --quick
running the whole pipeline (on-policy pairs from the model's own answers, every method, the tables and the figure)."""
import json
import math

import pytest

from experiments import prior_study as ps
from rlhfv_train.data.synthetic import parse_description


def test_mean_ci_and_paired_test_match_the_textbook():
    mean, half = ps.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302652729911275 / math.sqrt(3))  # t(0.975, 2) * sd / sqrt(n)
    runs = [{"method": m, "pairs": 64, "seed": s, "chair_s": value}
            for s, (a, b) in enumerate([(0.5, 0.4), (0.6, 0.4), (0.7, 0.4)]) for m, value in (("x", a), ("y", b))]
    test = ps.paired(runs, "x", "y", 64, "chair_s")
    t = 0.2 / (0.1 / math.sqrt(3))  # differences 0.1, 0.2, 0.3
    assert test["diff"] == pytest.approx(0.2) and test["ci"] == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))
    assert test["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))  # Student t with 2 degrees of freedom


def test_holm_steps_down():
    assert ps.holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    assert ps.holm([0.01, 0.02]) == [True, True]
    assert ps.holm([0.06, 0.001]) == [False, True]


def test_default_run_rule_needs_three_spreads():
    runs = []
    for seed, fall in enumerate([0.10, 0.12, 0.11, 0.09]):
        runs += [{"method": "start (sft)", "pairs": 0, "seed": seed, "chair_s": 0.5},
                 {"method": "ddpo-paper", "pairs": 64, "seed": seed, "chair_s": 0.5 - fall},
                 {"method": "ddpo-paper", "pairs": 128, "seed": seed, "chair_s": 0.5 - fall * (seed % 2)}]
    rule = {r["pairs"]: r["clear"] for r in ps.comparisons(runs, (64, 128))["default-run rule"]}
    assert rule == {64: True, 128: False}


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="--methods: unknown"):
        ps.check(ps.StudyConfig(methods="dpo,ppo"))
    with pytest.raises(ValueError, match="--sizes must be increasing"):
        ps.check(ps.StudyConfig(sizes=(64, 32)))
    assert ps.steps_for(64, ps.StudyConfig()) == 32 and ps.steps_for(3, ps.StudyConfig()) == 2


def test_quick_study_runs_every_method_on_the_models_own_corrected_answers(tmp_path):
    out = tmp_path / "study"
    assert ps.main(["--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--no-progress"]) == 0
    result = json.loads((tmp_path / "study.json").read_text())
    runs = result["runs"]
    assert sorted({(r["method"], r["pairs"]) for r in runs}) == sorted(
        [("start (sft)", 0)] + [(m, size) for m in ps.METHOD_NAMES for size in (8, 16)])
    assert all(0 <= r["chair_s"] <= 1 and 0 <= r["recall"] <= 1 for r in runs)
    pairs = [json.loads(line) for line in (tmp_path / "work" / "seed0" / "pairs16.jsonl").read_text().splitlines()]
    for pair in pairs:  # the rejected answer hallucinates; its correction mentions only what is there
        truth = {tuple(o) for o in pair["objects"]}
        assert set(parse_description(pair["rejected"])) - truth
        assert set(parse_description(pair["chosen"])) <= truth and pair["reward_margin"] >= 1
    assert "Primary: ddpo-paper minus dpo" in (tmp_path / "study.md").read_text()
    assert (tmp_path / "study.png").stat().st_size > 0


def test_the_plan_names_real_options_and_the_defaults_are_the_plan():
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "experiments.md").read_text()
    plan = text[text.index("## The prior-world study: the plan"):]
    plan = plan[:plan.index("\n## ", 1)] if "\n## " in plan[1:] else plan
    known = {o for action in ps.build_parser()._actions for o in action.option_strings}
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", plan)) <= known
    cfg = ps.StudyConfig()
    assert f"{', '.join(map(str, cfg.sizes[:-1]))} and {cfg.sizes[-1]} pairs" in plan
    assert float(re.search(r"learning rate: \*\*([0-9.e-]+)\*\*", plan)[1]) == cfg.lr
    assert f"{cfg.epochs} epochs" in plan and f"{cfg.pool} pool images" in plan
    assert f"Seeds**: 0-{cfg.seeds - 1}" in plan and f"{cfg.held_out} held-out images" in plan


def test_offline_pairs_are_the_scenes_synthetic_pairs():
    import random

    from experiments.prior_world import EVAL_WORLD, record, training_scene
    from rlhfv_train.data.synthetic import describe

    rng = random.Random(3)
    pool = [record(training_scene(rng, EVAL_WORLD), rng) for _ in range(6)]
    pairs = ps.collect_pairs(None, None, pool, ps.StudyConfig(pairs="offline", sizes=(6,)), seed=0)
    assert sorted(p["chosen"] for p in pairs) == sorted(describe(r.objects) for r in pool)
    assert all(p["rejected"] != p["chosen"] and isinstance(p["image"][0], bytes) for p in pairs)
    with pytest.raises(ValueError, match="gave 6 pairs, fewer than the largest size 7; raise --pool"):
        ps.collect_pairs(None, None, pool, ps.StudyConfig(pairs="offline", sizes=(7,), pool=6), seed=0)
