"""Instance names, the list table and --signal values (pure code)."""

import click
import pytest

from hpcrun.errors import UsageError
from hpcrun.instance import _signal_number, _tabulate
from hpcrun.runtime.instances import PER_TASK, check_name, for_join
from hpcrun.start import Request


@pytest.mark.parametrize("name", ["web", "a.b_c-1", "A" * 64, "..", "-x"])
def test_apptainers_names_are_accepted(name):
    check_name(name)


@pytest.mark.parametrize("name", ["", "a/b", "a b", "a*", "é", "x\n", "A" * 65])
def test_other_names_are_refused(name):
    with pytest.raises(UsageError, match="not a valid instance name"):
        check_name(name)


def test_table_is_gos_tabwriter_with_padding_4():
    rows = [["INSTANCE NAME", "PID", "IP", "IMAGE"], ["web", "12345", "", "/x.sif"]]
    assert _tabulate(rows) == "INSTANCE NAME    PID      IP    IMAGE\nweb              12345          /x.sif\n"


@pytest.mark.parametrize("text,number", [("TERM", 15), ("SIGTERM", 15), ("sigint", 2), ("15", 15), ("kill", 9)])
def test_signal_names_and_numbers(text, number):
    assert _signal_number(text) == number


@pytest.mark.parametrize("text", ["NOPE", "0", "999", "SIG_IGN", "-1"])
def test_bad_signals(text):
    with pytest.raises(click.BadParameter):
        _signal_number(text)


def test_join_of_an_instance_image_that_starts_one_is_refused():
    with pytest.raises(UsageError, match="cannot start another instance"):
        for_join(Request("exec", {"instance": {"mode": "start"}}, "instance://x", ["true"]))


def test_per_task_options_are_options():
    from hpcrun.options import defaults

    assert set(PER_TASK) <= set(defaults())
