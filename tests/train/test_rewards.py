"""Grouped-comparison scores, group-normalised advantages and the exact scene judge (rlhfv_train.grpo.rewards)."""
import itertools

import pytest
import torch

from rlhfv_train.data import PreferenceRecord
from rlhfv_train.grpo.rewards import SceneJudge, group_advantages, grouped_comparison, scene_reward
from rlhfv_train.data.synthetic import describe

TRUTH = [("red", "circle", "left"), ("blue", "square", "right")]
RECORD = PreferenceRecord(question="describe the image .", chosen="x", rejected="y", objects=TRUTH)


def test_grouped_comparison_matches_the_formula_with_a_position_biased_judge():
    strength = {"a": 0.9, "b": 0.5, "c": 0.1}

    def judge(record, pairs):  # prefers whatever is shown first a little: P = sigmoid(s1 - s2 + 0.3)
        return [torch.sigmoid(torch.tensor(strength[x] - strength[y] + 0.3)).item() for x, y in pairs]

    answers = ["a", "b", "c"]
    scores = grouped_comparison(RECORD, answers, judge)
    k = len(answers)
    for i, a in enumerate(answers):
        expected = sum(judge(None, [(a, b)])[0] + 1.0 - judge(None, [(b, a)])[0]
                       for j, b in enumerate(answers) if j != i) / (2 * (k - 1))
        assert scores[i] == pytest.approx(expected)
    assert scores[0] > scores[1] > scores[2]
    # Both orders are asked, so a judge that always says "first" gives every answer exactly 0.5.
    assert grouped_comparison(RECORD, answers, lambda r, pairs: [1.0] * len(pairs)) == [0.5] * 3
    assert sum(scores) == pytest.approx(k / 2)  # each of the k(k-1)/2 pairs hands out one win in each order


def test_grouped_comparison_rejects_bad_groups_and_judges():
    with pytest.raises(ValueError, match="at least 2 answers"):
        grouped_comparison(RECORD, ["only"], lambda r, p: [0.5] * len(p))
    with pytest.raises(ValueError, match="returned 1 scores for 2 pairs"):
        grouped_comparison(RECORD, ["a", "b"], lambda r, p: [0.5])
    with pytest.raises(ValueError, match="not a probability"):
        grouped_comparison(RECORD, ["a", "b"], lambda r, p: [1.5] * len(p))


def test_group_advantages_centre_and_scale_each_group():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    adv = group_advantages(rewards)
    row = rewards[0]
    torch.testing.assert_close(adv[0], (row - row.mean()) / (row.std() + 1e-4))
    assert torch.all(adv[1] == 0)  # all alike: nothing to learn from this group
    torch.testing.assert_close(group_advantages(rewards, scale=False)[0], row - row.mean())
    for bad in (torch.zeros(4), torch.zeros(3, 1)):
        with pytest.raises(ValueError, match="groups, k"):
            group_advantages(bad)


def test_scene_judge_prefers_fewer_hallucinations_then_more_correct_objects():
    exact = describe(TRUTH)
    partial = describe(TRUTH[:1])                               # 0 wrong, 1 right
    wrong = describe([("orange", "circle", "left")])            # 1 wrong, 0 right
    mixed = describe([TRUTH[0], ("green", "diamond", "middle")])  # 1 wrong, 1 right
    order = [exact, partial, mixed, wrong]  # best to worst
    judge = SceneJudge()
    for (i, a), (j, b) in itertools.product(enumerate(order), repeat=2):
        expected = 0.5 if i == j else (1.0 if i < j else 0.0)
        assert judge(RECORD, [(a, b)]) == [expected], (a, b)
    scores = grouped_comparison(RECORD, order, judge)
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0 and scores[-1] == 0.0
    assert [scene_reward(RECORD, a) for a in order] == [1.0, 0.5, 0.0, -0.5]
    with pytest.raises(ValueError, match="ground-truth 'objects'"):
        judge(PreferenceRecord(question="q", chosen="a", rejected="b", source="d.jsonl:3"), [(exact, wrong)])


def test_scene_judge_rules_differ_on_saying_nothing():
    """net: one error is worth naming two more correct objects; strict: an answer that names nothing wins."""
    record = PreferenceRecord(question="q", chosen="a", rejected="b", source="d.jsonl:1",
                              objects=TRUTH + [("purple", "diamond", "middle")])
    bold = describe(TRUTH + [("green", "circle", "middle")])   # 1 wrong, 2 right: net 1
    silent = ""                                                 # 0 wrong, 0 right: net 0
    assert SceneJudge()(record, [(bold, silent), (silent, bold)]) == [1.0, 0.0]
    assert SceneJudge(rule="strict")(record, [(bold, silent), (silent, bold)]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="rule must be one of net, strict"):
        SceneJudge(rule="lenient")
