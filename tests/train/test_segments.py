"""correction_weights on hand-made pairs (DESIGN.md §2)."""
import pytest

from rlhfv_train.data.token_weights import correction_weights

G = 5.0


def test_identical_answers_have_unit_weights():
    ids = [4, 8, 15, 16, 23, 42]
    assert correction_weights(ids, ids, G) == ([1.0] * 6, [1.0] * 6)


def test_replacement_gets_gamma_on_both_sides():
    # "there is a red cat on the mat" vs "there is a blue dog on the mat": 2 tokens replaced by 2 others.
    chosen = [1, 2, 3, 10, 11, 5, 6, 7]
    rejected = [1, 2, 3, 20, 21, 5, 6, 7]
    c, r = correction_weights(chosen, rejected, G)
    assert c == [1, 1, 1, G, G, 1, 1, 1]
    assert r == [1, 1, 1, G, G, 1, 1, 1]


def test_replacement_of_different_lengths():
    chosen = [1, 2, 3, 10, 5, 6, 7]
    rejected = [1, 2, 3, 20, 21, 22, 5, 6, 7]
    c, r = correction_weights(chosen, rejected, G)
    assert c == [1, 1, 1, G, 1, 1, 1]
    assert r == [1, 1, 1, G, G, G, 1, 1, 1]


def test_pure_insertion_and_deletion_keep_unit_weight():
    base = [1, 2, 3, 4, 5, 6]
    inserted = [1, 2, 3, 30, 31, 4, 5, 6]
    c, r = correction_weights(inserted, base, G)  # the correction added tokens
    assert c == [1.0] * 8 and r == [1.0] * 6
    c, r = correction_weights(base, inserted, G)  # the correction deleted them
    assert c == [1.0] * 6 and r == [1.0] * 8


def test_short_matches_merge_into_the_changed_span():
    # A single shared token (9) inside the rewrite is shorter than min_match=3: the whole middle is one replacement.
    chosen = [1, 2, 3, 10, 9, 11, 5, 6, 7]
    rejected = [1, 2, 3, 20, 9, 21, 5, 6, 7]
    c, r = correction_weights(chosen, rejected, G)
    assert c == [1, 1, 1, G, G, G, 1, 1, 1]
    assert r == [1, 1, 1, G, G, G, 1, 1, 1]
    # With min_match=1 the shared token splits it into two replacements and keeps weight 1.
    c, r = correction_weights(chosen, rejected, G, min_match=1)
    assert c == [1, 1, 1, G, 1, G, 1, 1, 1]


def test_short_common_prefix_does_not_anchor():
    # Only 2 shared leading tokens (< 3): everything differs, both sides non-empty -> one replacement.
    chosen = [1, 2, 10, 11, 12]
    rejected = [1, 2, 20, 21]
    c, r = correction_weights(chosen, rejected, G)
    assert c == [G] * 5 and r == [G] * 4


def test_empty_sides():
    assert correction_weights([], [], G) == ([], [])
    assert correction_weights([1, 2], [], G) == ([1.0, 1.0], [])  # a deletion of everything


def test_published_gamma_values_and_bad_arguments():
    c, _ = correction_weights([1, 2, 3, 4], [1, 2, 3, 5], 1.1)
    assert c == [1, 1, 1, 1.1]
    with pytest.raises(ValueError, match="gamma"):
        correction_weights([1], [2], -1.0)
    with pytest.raises(ValueError, match="min_match"):
        correction_weights([1], [2], 5.0, min_match=0)
