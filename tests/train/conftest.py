"""Fixtures the trainers' tests share."""
import pytest


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """40 synthetic scene records (seed 5) as a JSONL file with its images: the trainers' tests' data, read only (a
    module that needs other data defines its own `dataset`)."""
    from rlhfv_train.data import synthetic
    return synthetic.generate(str(tmp_path_factory.mktemp("scenes")), 40, seed=5)
