import pytest

from ckptdiff.metrics.patch import index_itemsize, patch_cost


def test_sizes_by_hand() -> None:
    # 1000 bf16 entries, 10 changed: sparse 10*(4+2)=60, bitmask 125+20=145, dense 2000
    c = patch_cost(1000, 10, 2)
    assert (c.sparse, c.bitmask, c.dense, c.choice, c.bytes) == (60, 145, 2000, "sparse", 60)


def test_bitmask_wins_in_the_middle_and_dense_when_most_change() -> None:
    # 800 fp32 entries: 100 changed -> sparse 800, bitmask 100+400=500, dense 3200
    assert patch_cost(800, 100, 4).choice == "bitmask"
    # 800 int8 entries, 790 changed -> bitmask 100+790=890 > dense 800
    assert patch_cost(800, 790, 1).choice == "dense"


def test_nothing_changed_costs_nothing() -> None:
    c = patch_cost(64, 0, 2)
    assert c.choice == "none" and c.bytes == 0


def test_index_width_switches_at_two_to_the_31() -> None:
    assert index_itemsize(2**31 - 1) == 4
    assert index_itemsize(2**31) == 8
    assert patch_cost(2**31, 1, 2).sparse == 8 + 2


def test_inconsistent_counts_refused() -> None:
    with pytest.raises(ValueError):
        patch_cost(10, 11, 2)
