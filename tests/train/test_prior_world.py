"""experiments/prior_world.py (issue 46): the world's priors hold in its training scenes, the probes show what they
say, the error counts read answers as documented, and --quick runs the pipeline."""
import json
import random

import pytest

from experiments import prior_world as pw
from rlhfv_train.data.synthetic import COLORS, TYPICAL_COLOR, describe


def test_training_scenes_carry_the_priors():
    rng, world = random.Random(0), pw.World(pair_prob=0.95, color_prob=0.9)
    scenes = [pw.training_scene(rng, world) for _ in range(4000)]
    with_square = [s for s in scenes if any(o[1] == "square" for o in s)]
    paired = sum(any(o[1] == "circle" for o in s) for s in with_square) / len(with_square)
    typical = [o[0] == TYPICAL_COLOR[o[1]] for s in scenes for o in s]
    assert 0.93 < paired < 0.98 and 0.88 < sum(typical) / len(typical) < 0.95
    assert all(len({o[2] for o in s}) == len(s) for s in scenes)  # one object per column


def test_probes_show_what_they_claim():
    rng, world = random.Random(1), pw.World()
    for _ in range(500):
        probe = pw.partner_probe(rng, world, control=False)
        assert any(o[1] == "square" for o in probe) and not any(o[1] == "circle" for o in probe)
        control = pw.partner_probe(rng, world, control=True)
        assert not any(o[1] in ("square", "circle") for o in control)
        (colour, shape, _), = pw.colour_probe(rng)
        assert colour in pw.atypical_colours(shape) and pw.TYPICAL_SHAPE[colour] != shape
    assert pw.atypical_colours("circle") == [c for c in COLORS if c not in ("red", "orange")]


def test_errors_are_read_as_documented():
    assert pw.partner_errors([describe([("red", "circle", "left")]), describe([("blue", "square", "left")])]) == 0.5
    scenes = [[("blue", "circle", "left")]] * 4
    answers = [describe([("blue", "square", "left")]),     # blue's typical shape
               describe([("blue", "triangle", "left")]),   # another wrong shape
               describe([("red", "circle", "left")]),      # the circle's typical colour
               describe([("blue", "circle", "left")])]     # right
    rates = pw.colour_errors(answers, scenes)
    assert rates == pytest.approx({"typical shape": 1 / 4, "other shape": 1 / 4 / 2, "typical colour": 1 / 4,
                                   "other colour": 0.0})
    with pytest.raises(ValueError, match="pair_prob must be in"):
        pw.World(pair_prob=1.5).check()


def test_error_kinds_tell_priors_from_perception():
    scene = [("blue", "triangle", "left"), ("yellow", "square", "middle")]
    answer = describe([("blue", "square", "left"),      # shape from colour: blue is the square's colour
                       ("blue", "square", "middle"),    # colour from shape: the square's typical colour
                       ("red", "circle", "right")])     # a circle beside a square, none there
    assert pw.error_kinds(answer, scene) == {"co-occurrence prior": 1, "shape from colour": 1,
                                             "colour from shape": 1, "perception": 0}
    assert pw.error_kinds(describe([("green", "diamond", "left"), ("yellow", "square", "middle")]), scene) == {
        "co-occurrence prior": 0, "shape from colour": 0, "colour from shape": 0, "perception": 1}
    no_square = [("blue", "triangle", "left")]
    assert pw.error_kinds(describe([("red", "circle", "right")]), no_square)["perception"] == 1
    assert pw.error_split([answer, describe(scene)], [scene, scene]) == {
        "co-occurrence prior": 0.5, "shape from colour": 0.5, "colour from shape": 0.5, "perception": 0.0}


def test_quick_profile_runs(tmp_path):
    out = tmp_path / "profile.json"
    assert pw.main(["--quick", "--out", str(out)]) == 0
    profile = json.loads(out.read_text())
    assert [p["seed"] for p in profile["seeds"]] == [0]
    assert {"circle named beside a square (prior)", "unbiased chair_s",
            "unbiased shape from colour errors per answer"} <= set(profile["mean"])


def test_the_docs_name_real_options():
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "experiments.md").read_text()
    section = text[text.index("## A world with language priors"):]
    section = section[:section.index("\n## ")]  # its own section: the study's plan after it names the study's flags
    known = {o for action in pw.build_parser()._actions for o in action.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", section))
    assert named and named <= known, named - known
