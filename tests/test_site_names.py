"""Site names sort naturally wherever people read them (site-2 before site-10)."""

from __future__ import annotations

from pathlib import Path

from client.site import site_dirs
from common.site_names import natural_key
from server.phases import RunState


def test_digit_runs_compare_as_numbers_and_text_as_text() -> None:
    names = ["site-10", "site-2", "north", "site-1", "site-1b", "h12-ward3", "h2-ward10", "h2-ward9"]
    assert sorted(names, key=natural_key) == ["h2-ward9", "h2-ward10", "h12-ward3", "north", "site-1", "site-1b",
                                              "site-2", "site-10"]


def test_a_layout_of_twelve_sites_lists_them_in_natural_order(tmp_path: Path) -> None:
    for i in range(1, 13):
        (tmp_path / f"site-{i}" / "vault").mkdir(parents=True)
        (tmp_path / f"site-{i}" / "key").write_text("k")
    (tmp_path / "notes").mkdir()  # not a site: no vault
    assert [p.name for p in site_dirs(tmp_path)] == [f"site-{i}" for i in range(1, 13)]


def test_the_coordinator_orders_nodes_by_their_sites_natural_order() -> None:
    state = RunState(run_id="r")
    state.sites = {"7": "site-10", "3": "site-2", "9": "site-1"}
    assert sorted([7, 3, 9], key=state.site_order) == [9, 3, 7]


def test_sites_that_left_for_the_same_reason_are_named_together_in_natural_order() -> None:
    from server.phases import excluded_words

    refused = "census: refused by the site's privacy policy: its policy requires differential privacy"
    excluded = {"site-10": refused, "site-2": "cnn round 1: no reply within 150 s", "site-1": refused}
    assert excluded_words(excluded) == (f"site-1, site-10: {refused}; "
                                        "site-2: cnn round 1: no reply within 150 s")
