"""Plot titles: long automatic run names wrap at underscores, never mid-word."""

import pytest

from reporting import _fit

NAME = "rsst_res20s_digits_exp_custom_exponents_reg1_exp4_magnitude_rate0.2_20261203-062718"


@pytest.mark.parametrize("width", [20, 40, 60, 70])
def test_title_wraps_at_underscores(width):
    lines = _fit(NAME, width).split("\n")
    assert "".join(lines) == NAME  # nothing lost or added
    assert len(lines) > 1 and all(len(line) <= width for line in lines)
    assert all(line.endswith("_") for line in lines[:-1])  # every break follows an underscore
    assert all(part in NAME.split("_") for line in lines for part in line.rstrip("_").split("_"))


def test_short_title_is_one_line_and_an_overlong_part_is_cut():
    assert _fit("rsst_vit_tiny", 60) == "rsst_vit_tiny"
    assert _fit("x" * 25, 10).split("\n") == ["x" * 10, "x" * 10, "x" * 5]
