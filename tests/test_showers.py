"""Behaviour of the ragged :class:`caloadapt.data.Showers` batch."""

from __future__ import annotations

import numpy as np
import pytest

from caloadapt.data import ENERGY, Showers
from caloadapt.errors import InputError

COUNTS = [3, 0, 5, 1, 0, 4, 2]


@pytest.fixture
def showers(make_showers) -> Showers:
    return make_showers(COUNTS, seed=1, geometry="calochallenge-3")


def _per_shower(s: Showers) -> list[np.ndarray]:
    return [s.points[s.offsets[i]:s.offsets[i + 1]] for i in range(len(s))]


def _assert_selection(sub: Showers, full: Showers, index) -> None:
    """``sub`` holds the showers ``index`` of ``full``, in that order, with their metadata."""
    index = list(index)
    assert len(sub) == len(index)
    np.testing.assert_array_equal(sub.n_points, full.n_points[index])
    for k, i in enumerate(index):
        np.testing.assert_array_equal(sub.shower(k), full.shower(i))
    np.testing.assert_array_equal(sub.incident_energy_mev, full.incident_energy_mev[index])
    assert sub.meta.keys() == full.meta.keys()
    for key in full.meta:
        np.testing.assert_array_equal(sub.meta[key], full.meta[key][index])
    assert (sub.particle, sub.geometry) == (full.particle, full.geometry)
    assert sub.offsets[0] == 0 and sub.offsets[-1] == len(sub.points)


# -- construction --------------------------------------------------------------------------------
def test_construction_types_and_sizes(showers: Showers) -> None:
    assert len(showers) == len(COUNTS)
    assert showers.points.dtype == np.float32 and showers.points.shape == (sum(COUNTS), 4)
    assert showers.offsets.dtype == np.int64
    assert showers.incident_energy_mev.dtype == np.float64
    np.testing.assert_array_equal(showers.n_points, COUNTS)
    np.testing.assert_array_equal(showers.offsets, np.concatenate([[0], np.cumsum(COUNTS)]))
    np.testing.assert_array_equal(showers.shower_index, np.repeat(np.arange(len(COUNTS)), COUNTS))


def test_from_list_matches_from_counts(showers: Showers) -> None:
    rebuilt = Showers.from_list(_per_shower(showers), showers.incident_energy_mev,
                                particle=showers.particle, geometry=showers.geometry)
    np.testing.assert_array_equal(rebuilt.points, showers.points)
    np.testing.assert_array_equal(rebuilt.offsets, showers.offsets)
    empty = Showers.from_list([], np.zeros(0))
    assert len(empty) == 0 and empty.points.shape == (0, 4)


def test_shower_returns_the_rows_of_each_shower(showers: Showers) -> None:
    start = 0
    for i, n in enumerate(COUNTS):
        np.testing.assert_array_equal(showers.shower(i), showers.points[start:start + n])
        start += n


def test_empty_batch() -> None:
    e = Showers.empty("photon", "ild-ecal")
    assert len(e) == 0 and e.points.shape == (0, 4)
    assert e.energy_sum_mev.shape == (0,)
    assert (e.particle, e.geometry) == ("photon", "ild-ecal")
    dense, mask = e.padded()
    assert dense.shape == (0, 0, 4) and mask.shape == (0, 0)


# -- invalid input -------------------------------------------------------------------------------
@pytest.mark.parametrize("offsets, n_points, n_showers", [
    ([0, 2], 3, 2),          # wrong length
    ([1, 2, 3], 3, 2),       # does not start at 0
    ([0, 2, 1, 3], 3, 3),    # decreasing
    ([0, 1, 2], 3, 2),       # does not end at the number of points
    ([0, 1, 4], 3, 2),       # ends beyond the points
])
def test_invalid_offsets_raise_input_error(offsets, n_points, n_showers) -> None:
    with pytest.raises(InputError, match="offsets"):
        Showers(np.zeros((n_points, 4)), offsets, np.ones(n_showers))


def test_unknown_particle_and_bad_meta_raise_input_error() -> None:
    with pytest.raises(InputError, match="muon"):
        Showers(np.zeros((1, 4)), [0, 1], [1.0], particle="muon")
    with pytest.raises(InputError, match="meta 'x'"):
        Showers(np.zeros((1, 4)), [0, 1], [1.0], meta={"x": np.zeros(3)})


# -- slicing (views) -----------------------------------------------------------------------------
@pytest.mark.parametrize("sl", [slice(1, 4), slice(0, None), slice(2, 3), slice(-3, None), slice(5, 2)])
def test_contiguous_slices_are_correct_views(showers: Showers, sl: slice) -> None:
    sub = showers[sl]
    _assert_selection(sub, showers, range(len(showers))[sl])
    if len(sub.points):
        assert np.shares_memory(sub.points, showers.points)
    if len(sub):
        assert np.shares_memory(sub.incident_energy_mev, showers.incident_energy_mev)


def test_slice_view_writes_through(showers: Showers) -> None:
    sub = showers[2:4]
    before = showers.shower(2).copy()
    sub.points[:, ENERGY] += 100.0
    np.testing.assert_array_equal(showers.shower(2)[:, ENERGY], before[:, ENERGY] + 100.0)


def test_integer_index_gives_one_shower(showers: Showers) -> None:
    for i in (0, 2, -1, -2):
        one = showers[i]
        assert len(one) == 1
        np.testing.assert_array_equal(one.points, showers.shower(i % len(showers)))
        assert np.shares_memory(one.points, showers.points) or len(one.points) == 0
    with pytest.raises(IndexError):
        showers[len(COUNTS)]
    with pytest.raises(IndexError):
        showers[-len(COUNTS) - 1]


# -- gathers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [
    [5, 0, 2], [1, 1, 3, 4, 1], np.array([6, 2, 0, 5]), [-1, 0], np.arange(len(COUNTS))[::-1], [3],
])
def test_fancy_index_gathers_like_a_per_shower_loop(showers: Showers, index) -> None:
    sub = showers[index]
    _assert_selection(sub, showers, np.asarray(index) % len(showers))
    assert not np.shares_memory(sub.points, showers.points)


def test_strided_slice_gathers(showers: Showers) -> None:
    _assert_selection(showers[::2], showers, range(0, len(COUNTS), 2))
    _assert_selection(showers[::-1], showers, range(len(COUNTS) - 1, -1, -1))


def test_boolean_mask_selects_like_a_loop(showers: Showers) -> None:
    mask = np.array([True, False, True, True, False, False, True])
    _assert_selection(showers[mask], showers, np.flatnonzero(mask))
    assert len(showers[np.zeros(len(COUNTS), bool)]) == 0
    with pytest.raises(IndexError):
        showers[np.ones(3, bool)]


def test_empty_integer_array_selects_nothing(showers: Showers) -> None:
    sub = showers[np.array([], dtype=np.int64)]
    assert len(sub) == 0 and sub.points.shape == (0, 4)


def test_empty_list_selects_nothing(showers: Showers) -> None:
    sub = showers[[]]
    assert len(sub) == 0 and sub.points.shape == (0, 4)


# -- concatenate, chunks, padded, energy sums -----------------------------------------------------
def test_concatenate_restores_the_batch(showers: Showers) -> None:
    parts = [showers[0:2], showers[2:3], showers[3:3], showers[3:]]
    joined = Showers.concatenate(parts)
    _assert_selection(joined, showers, range(len(showers)))


def test_concatenate_keeps_common_meta_and_refuses_mixed_batches(showers: Showers, make_showers) -> None:
    a = showers[:3]
    b = Showers(showers[3:].points, showers[3:].offsets, showers[3:].incident_energy_mev,
                showers.particle, showers.geometry, {"tag": showers.meta["tag"][3:]})
    joined = Showers.concatenate([a, b])
    assert set(joined.meta) == {"tag"}
    np.testing.assert_array_equal(joined.meta["tag"], showers.meta["tag"])
    other_geometry = make_showers([2], geometry="calochallenge-2")
    with pytest.raises(InputError):
        Showers.concatenate([a, other_geometry])
    other_particle = make_showers([2], geometry="calochallenge-3", particle="photon")
    with pytest.raises(InputError):
        Showers.concatenate([a, other_particle])
    with pytest.raises(InputError):
        Showers.concatenate([])


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_chunks_cover_the_batch_in_order(showers: Showers, size: int) -> None:
    chunks = list(showers.chunks(size))
    assert [len(c) for c in chunks[:-1]] == [size] * (len(chunks) - 1)
    assert 1 <= len(chunks[-1]) <= size
    _assert_selection(Showers.concatenate(chunks), showers, range(len(showers)))
    for c in chunks:
        if len(c.points):
            assert np.shares_memory(c.points, showers.points)


def test_chunks_rejects_non_positive_size(showers: Showers) -> None:
    with pytest.raises(ValueError):
        list(showers.chunks(0))


def test_padded_places_points_first_and_masks_the_rest(showers: Showers) -> None:
    dense, mask = showers.padded()
    assert dense.shape == (len(COUNTS), max(COUNTS), 4) and dense.dtype == np.float32
    for i, n in enumerate(COUNTS):
        np.testing.assert_array_equal(mask[i], np.arange(max(COUNTS)) < n)
        np.testing.assert_array_equal(dense[i, :n], showers.shower(i))
        assert np.all(dense[i, n:] == 0)
    wide, wide_mask = showers.padded(10)
    assert wide.shape == (len(COUNTS), 10, 4) and wide_mask.sum() == sum(COUNTS)
    with pytest.raises(ValueError):
        showers.padded(max(COUNTS) - 1)


def test_energy_sum_with_empty_showers(showers: Showers) -> None:
    expected = [float(np.sum(p[:, ENERGY], dtype=np.float64)) for p in _per_shower(showers)]
    np.testing.assert_allclose(showers.energy_sum_mev, expected, rtol=1e-12)
    assert showers.energy_sum_mev[1] == 0.0 and showers.energy_sum_mev[4] == 0.0
    trailing_empty = Showers.from_list([np.ones((2, 4)), np.zeros((0, 4)), np.zeros((0, 4))], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(trailing_empty.energy_sum_mev, [2.0, 0.0, 0.0])
