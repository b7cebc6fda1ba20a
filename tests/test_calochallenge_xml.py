"""Parsing CaloChallenge binning XML: the shipped files, and one-line errors for broken ones."""

from __future__ import annotations

import numpy as np
import pytest

from caloadapt.errors import GeometryError
from caloadapt.geometry import parse_binning_xml

GOOD = ('<Bins><Bin pid="11" name="electron">'
        '<Layer id="1" r_edges="0,2,4" n_bin_alpha="3"/><Layer id="0" r_edges="0" n_bin_alpha="1"/></Bin></Bins>')


def test_a_layer_without_cells_and_the_layer_order(tmp_path):
    path = tmp_path / "binning.xml"
    path.write_text(GOOD)
    binning = parse_binning_xml(path)
    assert (binning.particle, binning.pid, binning.n_alpha) == ("electron", 11, (1, 3))
    np.testing.assert_array_equal(binning.r_edges_mm[0], [0.0])  # a layer without cells
    np.testing.assert_array_equal(binning.r_edges_mm[1], [0.0, 2.0, 4.0])


@pytest.mark.parametrize("text, message", [
    ("<Bins><Bin", "malformed binning XML"),
    ("<Bins></Bins>", "has no <Bin> element"),
    ('<Bins><Bin name="electron"></Bin></Bins>', "has no <Layer> elements"),
    ('<Bins><Bin name="electron"><Layer id="0" r_edges="0,a" n_bin_alpha="1"/></Bin></Bins>', "malformed"),
    ('<Bins><Bin name="electron"><Layer id="x" r_edges="0,1" n_bin_alpha="1"/></Bin></Bins>', "malformed"),
])
def test_broken_files_are_one_line_errors(text, message):
    with pytest.raises(GeometryError, match=message) as info:
        parse_binning_xml(text)
    assert "\n" not in str(info.value)


def test_missing_particle_and_missing_file(tmp_path):
    with pytest.raises(GeometryError, match="for particle 'pion'"):
        parse_binning_xml(GOOD, particle="pion")
    with pytest.raises(GeometryError, match="no such binning XML file"):
        parse_binning_xml(tmp_path / "missing.xml")
