"""experiments/prior_world.py (issue 46): the world's priors hold in its training scenes, the probes show what they
say, the error counts read answers as documented, and --quick runs the pipeline."""
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
        assert colour in pw.atypical_colours(shape) and colour != TYPICAL_COLOR[shape]
    assert pw.atypical_colours("circle") == [c for c in COLORS if c not in ("red", "orange")]


def test_errors_are_read_as_documented():
    assert pw.partner_errors([describe([("red", "circle", "left")]), describe([("blue", "square", "left")])]) == 0.5
    scenes = [[("blue", "circle", "left")]] * 3
    answers = [describe([("red", "circle", "left")]), describe([("green", "circle", "left")]),
               describe([("blue", "circle", "left")])]
    typical, other = pw.colour_errors(answers, scenes)
    assert typical == pytest.approx(1 / 3) and other == pytest.approx(1 / 3 / (len(COLORS) - 2))
    with pytest.raises(ValueError, match="pair_prob must be in"):
        pw.World(pair_prob=1.5).check()


def test_quick_profile_runs(tmp_path):
    out = tmp_path / "profile.json"
    assert pw.main(["--quick", "--out", str(out)]) == 0
    assert "circle named beside a square (prior)" in out.read_text()


def test_the_docs_name_real_options():
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "experiments.md").read_text()
    section = text[text.index("## A world with language priors"):]
    known = {o for action in pw.build_parser()._actions for o in action.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", section))
    assert named and named <= known, named - known
