"""Every number a command line takes is checked by argparse (adapterkit.cli.argtypes): a negative
count, a zero step budget or a non-finite learning rate is one line naming the option, before any
work; no option is a bare `type=int` / `type=float` that lets such values through."""

import argparse

import pytest

from adapterkit.cli import argtypes as at
from adapterkit.cli import build_parser, main

# options whose values may be any finite number (signed weights and scales)
ANY_NUMBER = {("merge", "--weights"), ("apply", "--scale"), ("remove", "--scale")}


def _subparsers(parser, path=()):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield path + (name,), sp
                yield from _subparsers(sp, path + (name,))


def test_no_command_line_number_is_unchecked():
    bare = []
    for path, sp in _subparsers(build_parser()):
        for a in sp._actions:
            if a.type in (int, float) and not any((path[-1], o) in ANY_NUMBER for o in a.option_strings):
                bare.append(f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}")
    assert not bare, f"options taking unchecked numbers: {bare}"


@pytest.mark.parametrize("argv, msg", [
    (["compare", "--lr", "-1"], "argument --lr: must be a positive number, got '-1'"),
    (["compare", "--lr", "inf"], "argument --lr: must be a positive number, got 'inf'"),
    (["compare", "--seeds", "0"], "argument --seeds: must be a positive integer, got 0"),
    (["demo", "--seed", "-3"], "argument --seed: must be a non-negative integer, got -3"),
    (["train", "cfg.yaml", "--max-steps", "x"], "argument --max-steps: must be a positive integer, got 'x'"),
    (["sft", "train-mlm", "--model", "m", "--data", "d", "--k", "4", "--out", "o", "--mlm-probability", "1"],
     "argument --mlm-probability: must be a number strictly between 0 and 1, got '1'"),
    (["sft", "train", "--model", "m", "--data", "d", "--k", "0", "--out", "o"],
     "argument --k: must be a positive integer, got 0"),
])
def test_bad_numbers_are_one_line_naming_the_option(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_argtypes_accept_what_they_promise():
    assert at.positive_int("3") == 3 and at.nonnegative_int("0") == 0
    assert at.positive_float("1e-4") == 1e-4 and at.nonnegative_float("0") == 0.0
    assert at.open_fraction("0.15") == 0.15
    for f, bad in ((at.positive_int, "0"), (at.nonnegative_int, "-1"), (at.positive_float, "nan"),
                   (at.nonnegative_float, "-0.1"), (at.open_fraction, "0"), (at.positive_int, "1.5")):
        with pytest.raises(argparse.ArgumentTypeError):
            f(bad)
    assert at.fraction("0") == 0.0 and at.fraction("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError):
        at.fraction("1.01")
