"""Geometries: binning XML, materials and mixtures (simulator reference §1, §5, §8 items 1-3),
cell lookup and voxelisation, YAML descriptions and their errors."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from caloadapt.data import Showers
from caloadapt.errors import GeometryError
from caloadapt.geometry import (
    BUILTIN_GEOMETRIES,
    MATERIALS,
    CylindricalReadout,
    Geometry,
    PlanarReadout,
    get_geometry,
    parse_binning_xml,
)

DATA_DIR = Path(str(resources.files("caloadapt.geometry") / "data"))
DS2_XML = DATA_DIR / "binning_dataset_2.xml"
DS3_XML = DATA_DIR / "binning_dataset_3.xml"

#: bottom y [mm] of the 30 CaloClouds ILD sensors (simulator reference §5.1)
ILD_SENSOR_BOTTOM_Y_MM = np.array([
    1811.340, 1814.465, 1823.810, 1826.935, 1836.280, 1839.405, 1848.750, 1851.875, 1861.220, 1864.345,
    1873.690, 1876.815, 1886.160, 1889.285, 1898.630, 1901.755, 1911.100, 1914.225, 1923.570, 1926.695,
    1938.140, 1943.365, 1954.810, 1960.035, 1971.480, 1976.705, 1988.150, 1993.375, 2004.820, 2010.045,
])
ILD_Y_OFFSET_MM = 1808.23


def rel(value: float, reference: float, tol: float = 0.01) -> bool:
    return abs(value / reference - 1.0) <= tol


# -- import ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_import", ["caloadapt.geometry", "caloadapt.geometry.materials", "caloadapt.data"])
def test_packages_import_first_in_fresh_interpreter(first_import: str) -> None:
    """No circular import whichever subpackage a user imports first."""
    code = (f"import {first_import}; from caloadapt.geometry import get_geometry; "
            "print(get_geometry('calochallenge-2').n_cells)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-800:]
    assert proc.stdout.strip() == "6480"


# -- binning XML ----------------------------------------------------------------------------------
def test_parse_ds3_binning_xml() -> None:
    b = parse_binning_xml(DS3_XML)
    assert (b.particle, b.pid) == ("electron", 11)
    assert len(b.r_edges_mm) == 45 and len(b.n_alpha) == 45
    for edges in b.r_edges_mm:
        np.testing.assert_allclose(edges, 2.325 * np.arange(19), atol=1e-9)
        assert edges[0] == 0.0 and edges[-1] == pytest.approx(41.85)
        assert len(edges) - 1 == 18
    assert set(b.n_alpha) == {50}
    g = get_geometry("calochallenge-3")
    assert g.n_layers == 45 and g.n_cells == 40500 == 45 * 50 * 18
    np.testing.assert_allclose(g.layer_edges_mm, 3.4 * np.arange(46), atol=1e-9)


def test_parse_ds2_binning_xml() -> None:
    b = parse_binning_xml(DS2_XML)
    assert len(b.r_edges_mm) == 45 and set(b.n_alpha) == {16}
    for edges in b.r_edges_mm:
        np.testing.assert_allclose(edges, 4.65 * np.arange(10), atol=1e-9)
    g = get_geometry("calochallenge-2")
    assert g.n_cells == 6480 == 45 * 16 * 9


def test_parse_xml_string_picks_particle_and_sorts_layers() -> None:
    text = ('<Bins><Bin pid="22" name="photon"><Layer id="0" r_edges="0,1" n_bin_alpha="1"/></Bin>'
            '<Bin pid="11" name="electron"><Layer id="1" r_edges="0,2,4" n_bin_alpha="3"/>'
            '<Layer id="0" r_edges="0,1,2,3" n_bin_alpha="5"/></Bin></Bins>')
    b = parse_binning_xml(text, particle="electron")
    assert b.pid == 11 and b.n_alpha == (5, 3)
    np.testing.assert_array_equal(b.r_edges_mm[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(b.r_edges_mm[1], [0, 2, 4])
    assert parse_binning_xml(text).particle == "photon"


@pytest.mark.parametrize("xml", [DS3_XML, DS2_XML])
def test_get_geometry_from_binning_xml_path(xml: Path) -> None:
    g = get_geometry(xml)
    builtin = get_geometry("calochallenge-3" if "3" in xml.stem else "calochallenge-2")
    assert g.n_cells == builtin.n_cells and g.n_layers == 45
    np.testing.assert_allclose(g.layer_edges_mm, builtin.layer_edges_mm)
    np.testing.assert_allclose(g.cell_centres_mm, builtin.cell_centres_mm)
    assert g.x0_mm == pytest.approx(builtin.x0_mm)
    assert get_geometry(str(xml)).n_cells == builtin.n_cells


def test_custom_binning_xml_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.xml"
    path.write_text('<Bins><Bin pid="11" name="electron">'
                    '<Layer id="0" r_edges="0,5,10" n_bin_alpha="4"/>'
                    '<Layer id="1" r_edges="0,5,10" n_bin_alpha="4"/></Bin></Bins>')
    g = get_geometry(path)
    assert g.n_layers == 2 and g.n_cells == 16
    assert g.readout.kind == "cylindrical"


# -- materials (§1.1, checklist item 1) ------------------------------------------------------------
@pytest.mark.parametrize("name, x0_mm", [("W", 3.504), ("Si", 93.7), ("Pb", 5.61)])
def test_material_radiation_lengths(name: str, x0_mm: float) -> None:
    assert rel(MATERIALS[name].x0_mm, x0_mm)


@pytest.mark.parametrize("name, ec_mev", [("W", 8.00), ("Pb", 7.36)])
def test_material_gflash_critical_energies(name: str, ec_mev: float) -> None:
    assert rel(MATERIALS[name].critical_energy_mev, ec_mev)


def test_tungsten_moliere_radius() -> None:
    assert rel(MATERIALS["W"].moliere_radius_mm, 9.3)


# -- Par04 effective quantities (§1.3, checklist item 2) ------------------------------------------
@pytest.mark.parametrize("name", ["calochallenge-2", "calochallenge-3"])
def test_par04_effective_quantities(name: str) -> None:
    g = get_geometry(name)
    m = g.shape_medium
    assert rel(m.x0_mm, 4.219)
    assert rel(m.moliere_radius_mm, 10.87)
    assert rel(m.critical_energy_mev, 8.23)
    assert rel(m.z_eff, 72.49)
    assert rel(m.sampling_frequency, 2.482)
    assert rel(m.mip_fraction, 0.0362)
    assert m.is_sampling
    assert g.x0_mm == m.x0_mm and g.moliere_radius_mm == m.moliere_radius_mm
    assert rel(g.stack.depth_mm, 153.0, 1e-9)


def test_par04_visible_fraction_is_the_calochallenge_convention() -> None:
    g = get_geometry("calochallenge-3")
    np.testing.assert_allclose(g.layer_visible_fraction, 0.033, rtol=1e-6)
    assert g.energy.calibration == pytest.approx(1 / 0.033)
    assert g.energy.threshold_mev == pytest.approx(0.5e-3 / 0.033)


# -- ILD (§5.1, checklist items 2 and 3) -----------------------------------------------------------
@pytest.fixture(scope="module")
def ild() -> Geometry:
    return get_geometry("ild-ecal")


def test_ild_sensor_positions_reproduce_caloclouds(ild: Geometry) -> None:
    sensors = ild.stack.active_slabs_mm
    assert sensors.shape == (30, 2)
    np.testing.assert_allclose(sensors[:, 1] - sensors[:, 0], 0.525, atol=1e-9)
    assert np.max(np.abs(sensors[:, 0] + ILD_Y_OFFSET_MM - ILD_SENSOR_BOTTOM_Y_MM)) < 1e-3
    np.testing.assert_allclose(ild.layer_centres_mm, sensors.mean(axis=1))
    assert ild.n_layers == 30


def test_ild_stack_one_layer_thickness_in_x0(ild: Geometry) -> None:
    t = ild.stack.x0_at(ild.stack.active_slabs_mm.mean(axis=1))
    per_layer = (t[2:20] - t[0:18]) / 2  # sensor centres two apart, all inside stack 1
    for value in per_layer:
        assert rel(value, 0.649)


def test_ild_stack_one_medium(ild: Geometry) -> None:
    m = ild.shape_medium
    assert rel(m.sampling_frequency, 1.54)
    assert rel(m.moliere_radius_mm, 20.6)


def test_ild_total_depth_and_tungsten(ild: Geometry) -> None:
    t_last = float(ild.stack.x0_at(ild.stack.active_slabs_mm[-1].mean()))
    assert rel(t_last, 24.8)
    tungsten = sum(s.thickness_mm for s in ild.stack.slabs if s.material.name == "W")
    assert tungsten == pytest.approx(81.9, abs=1e-9)


def test_ild_per_layer_mip_fraction(ild: Geometry) -> None:
    f_mip = np.array([m.mip_fraction for m in ild.layer_media])
    for layer in range(1, 19):
        assert rel(f_mip[layer], 0.0328), layer
    assert rel(f_mip[19], 0.0238)
    for layer in range(20, 29):
        assert rel(f_mip[layer], 0.0187), layer
    np.testing.assert_allclose(ild.layer_visible_fraction, 0.78 * f_mip)


def test_ild_layer_cells_end_half_way_in_x0(ild: Geometry) -> None:
    t_centres = ild.stack.x0_at(ild.layer_centres_mm)
    t_edges = ild.stack.x0_at(ild.layer_edges_mm)
    np.testing.assert_allclose(t_edges[1:-1], 0.5 * (t_centres[1:] + t_centres[:-1]), atol=1e-9)
    assert ild.layer_edges_mm[0] == 0.0 and ild.layer_edges_mm[-1] == pytest.approx(ild.stack.depth_mm)


# -- cells ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN_GEOMETRIES)
def test_cell_index_of_cell_centres_is_the_cell(name: str) -> None:
    g = get_geometry(name)
    centres = g.cell_centres_mm
    assert centres.shape == (g.n_cells, 3)
    np.testing.assert_array_equal(g.cell_index(centres), np.arange(g.n_cells))
    np.testing.assert_array_equal(g.cell_index(centres.astype(np.float32)), np.arange(g.n_cells))


def _random_voxels(g: Geometry, n: int, seed: int, per_shower: int = 400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    voxels = np.zeros((n, g.n_cells), np.float32)
    for i in range(n):
        cells = rng.choice(g.n_cells, size=min(per_shower, g.n_cells), replace=False)
        voxels[i, cells] = rng.uniform(0.05, 10.0, len(cells)).astype(np.float32)
    voxels[1] = 0.0  # one empty shower
    return voxels


@pytest.mark.parametrize("name", BUILTIN_GEOMETRIES)
def test_voxels_to_centre_points_to_voxels_is_exact(name: str) -> None:
    g = get_geometry(name)
    voxels = _random_voxels(g, 4, seed=3)
    energies = np.array([1e3, 2e3, 3e3, 4e3])
    points = g.points_from_voxels(voxels, energies)
    assert points.geometry == g.name and len(points) == 4
    np.testing.assert_array_equal(points.n_points, (voxels > 0).sum(axis=1))
    np.testing.assert_array_equal(points.incident_energy_mev, energies)
    np.testing.assert_array_equal(g.voxelise(points), voxels)
    np.testing.assert_array_equal(g.voxelise(points, sparse=True).toarray(), voxels)


@pytest.mark.parametrize("name", ["calochallenge-3", "calochallenge-2", "ild-ecal", "generic-mesh"])
def test_smeared_points_stay_in_their_cells(name: str) -> None:
    g = get_geometry(name)
    voxels = _random_voxels(g, 5, seed=4, per_shower=2000)
    points = g.points_from_voxels(voxels, np.full(5, 1e3), smear=True, rng=np.random.default_rng(5))
    centres = g.points_from_voxels(voxels, np.full(5, 1e3))
    np.testing.assert_array_equal(g.cell_index(points.points), g.cell_index(centres.points))
    np.testing.assert_array_equal(g.voxelise(points), voxels)
    # smearing really moves the points, over the whole depth of the layer
    assert np.mean(np.abs(points.points[:, :3] - centres.points[:, :3]) > 1e-3) > 0.9


@pytest.mark.parametrize("name", ["calochallenge-3", "ild-ecal"])
def test_dequantise_smears_hits_and_keeps_spots(name: str) -> None:
    from caloadapt.simulate import simulate

    g = get_geometry(name)
    spots = simulate(g, "electron", np.array([20e3, 40e3]), seed=2, level="spots")
    rng = np.random.default_rng(3)
    # spots sit inside their cells already: unchanged
    np.testing.assert_array_equal(g.dequantise(spots, rng).points, spots.points)
    hits = g.digitise(spots)
    moved = g.dequantise(hits, rng)
    # hits at cell centres are moved, inside the cells they read out
    assert np.mean(np.abs(moved.points[:, :2] - hits.points[:, :2]).max(axis=1) > 1e-3) > 0.9
    np.testing.assert_array_equal(g.cell_index(moved.points), g.cell_index(hits.points))


def test_smeared_points_never_leave_their_cells_in_large_samples() -> None:
    g = get_geometry("calochallenge-3")
    voxels = np.ones((20, g.n_cells), np.float32)  # every cell filled: 810 000 points
    points = g.points_from_voxels(voxels, np.full(20, 1e3), smear=True, rng=np.random.default_rng(1))
    expected = np.tile(np.arange(g.n_cells), 20)
    assert np.count_nonzero(g.cell_index(points.points) != expected) == 0


def test_smearing_is_uniform_in_area_and_depth() -> None:
    g = get_geometry("calochallenge-3")
    readout = g.readout
    layer, ia, ir = 7, 13, 3  # an annulus cell, r in [6.975, 9.3) mm
    local = ia * 18 + ir
    n = 40_000
    rng = np.random.default_rng(11)
    x, y = readout.sample(np.full(n, layer), np.full(n, local), rng)
    r0, r1 = 3 * 2.325, 4 * 2.325
    r2 = x**2 + y**2
    assert np.all((r2 >= r0**2 - 1e-9) & (r2 < r1**2 + 1e-9))
    assert np.mean(r2) == pytest.approx(0.5 * (r0**2 + r1**2), rel=0.005)
    assert np.mean(r2 < 0.5 * (r0**2 + r1**2)) == pytest.approx(0.5, abs=0.01)
    # a linear-in-r sampler would give mean r^2 = (r0^2 + r0 r1 + r1^2) / 3, clearly different
    assert abs(np.mean(r2) - (r0**2 + r0 * r1 + r1**2) / 3) > 0.1
    alpha = np.arctan2(y, x)
    lo, width = -np.pi + ia * 2 * np.pi / 50, 2 * np.pi / 50
    assert np.all((alpha >= lo - 1e-9) & (alpha < lo + width + 1e-9))
    assert np.mean(alpha) == pytest.approx(lo + width / 2, abs=0.002)
    # depth: uniform over the readout layer
    cell = g.readout.layer_offsets[layer] + local
    voxels = np.zeros((1, g.n_cells), np.float32)
    voxels[0, cell] = 1.0
    z = np.concatenate([g.points_from_voxels(voxels, [1e3], smear=True, rng=np.random.default_rng(s)).points[:, 2]
                        for s in range(2000)])
    assert np.all((z >= g.layer_edges_mm[layer]) & (z < g.layer_edges_mm[layer + 1]))
    assert np.mean(z) == pytest.approx(g.layer_centres_mm[layer], abs=0.05)


def test_radii_follow_an_exponential_area_density_inside_a_ring() -> None:
    from caloadapt.geometry.readout import sample_radius

    u = np.random.default_rng(0).random(100_000)
    for r0, r1, slope in ((0.0, 2.325, -1.0), (2.325, 4.65, -2.5), (6.975, 9.3, 0.0)):
        r = sample_radius(r0, r1, slope, u)
        assert np.all((r >= r0) & (r <= r1))
        grid = np.linspace(r0, r1, 200_001)
        weight = grid * np.exp(slope * grid)  # radial density of the area density exp(slope r)
        assert np.mean(r) == pytest.approx(np.sum(grid * weight) / np.sum(weight), abs=0.01)
        assert np.mean(r**2) == pytest.approx(np.sum(grid**2 * weight) / np.sum(weight), abs=0.02)


def test_profile_smearing_follows_the_energy_density_and_keeps_the_cells() -> None:
    from caloadapt.geometry.readout import radial_density_slopes
    from caloadapt.simulate import simulate

    g = get_geometry("calochallenge-3")
    # the slope between rings: ln(density) falls by ln(10) from ring to ring of 1 mm: -ln(10) per mm inside,
    # never rising, 0 next to an empty ring
    edges = np.arange(6.0)
    densities = 10.0 ** -np.arange(5.0)
    np.testing.assert_allclose(radial_density_slopes(edges, densities * np.pi * np.diff(edges**2)), -np.log(10))
    assert radial_density_slopes(edges, np.array([1.0, 5.0, 1.0, 0.0, 1.0]))[0] == 0.0
    assert radial_density_slopes(edges, np.array([1.0, 1.0, 1.0, 0.0, 1.0]))[2] == 0.0
    hits = simulate(g, "electron", np.full(8, 30e3), seed=4)
    uniform = g.dequantise(hits, np.random.default_rng(1))
    profile = g.dequantise(hits, np.random.default_rng(1), radial_profile=True)
    np.testing.assert_array_equal(g.cell_index(profile.points), g.cell_index(hits.points))
    # in the central ring, where the shower's energy density falls steeply, the points move inwards
    central = np.hypot(*hits.points[:, :2].T) < 2.325
    r_uniform, r_profile = (np.hypot(*s.points[central, :2].T) for s in (uniform, profile))
    assert np.mean(r_profile) < np.mean(r_uniform) - 0.2


def test_planar_smearing_is_uniform_in_the_square() -> None:
    readout = PlanarReadout(n_layers=1, pitch_mm=5.0, n_x=3, n_y=3)
    n = 20_000
    x, y = readout.sample(np.zeros(n, int), np.full(n, 4), np.random.default_rng(2))  # the central cell
    assert np.all((x >= -2.5) & (x < 2.5) & (y >= -2.5) & (y < 2.5))
    assert np.mean(x < 0) == pytest.approx(0.5, abs=0.015) and np.mean(y) == pytest.approx(0.0, abs=0.05)
    np.testing.assert_array_equal(readout.local_index(np.zeros(n, int), x, y), np.full(n, 4))


def test_planar_grid_is_centred_on_the_impact_point() -> None:
    g = get_geometry("ild-ecal")
    assert isinstance(g.readout, PlanarReadout) and g.readout.n_x == 79
    centre_cell = g.cell_index(np.array([[0.0, 0.0, g.layer_centres_mm[4]]]))[0]
    np.testing.assert_allclose(g.cell_centres_mm[centre_cell, :2], [0.0, 0.0], atol=1e-9)
    half = 79 * 5.0883 / 2
    inside = np.array([[half - 1e-3, 0.0, 10.0], [-half, -half, 10.0]])
    outside = np.array([[half + 1e-3, 0.0, 10.0], [0.0, -half - 1e-3, 10.0], [0.0, 0.0, -0.1],
                        [0.0, 0.0, g.layer_edges_mm[-1] + 0.1]])
    assert np.all(g.cell_index(inside) >= 0)
    np.testing.assert_array_equal(g.cell_index(outside), -1)


# -- CaloChallenge angle convention and limits ---------------------------------------------------
@pytest.mark.parametrize("name, n_alpha, n_r", [("calochallenge-3", 50, 18), ("calochallenge-2", 16, 9)])
def test_calochallenge_angular_bins(name: str, n_alpha: int, n_r: int) -> None:
    g = get_geometry(name)
    d_alpha = 2 * np.pi / n_alpha
    z = g.layer_centres_mm[0]
    r = 10.0
    ir = int(r // (41.85 / n_r))

    def alpha_bin(x: float, y: float) -> int:
        cell = g.cell_index(np.array([[x, y, z]]))[0]
        assert cell >= 0
        assert cell % n_r == ir  # radius fastest
        return int(cell // n_r)

    # +x axis, just above y = 0: the bin starting at alpha = 0, whose centre is the closest to 0
    j = alpha_bin(r, 1e-6)
    assert -np.pi + j * d_alpha == pytest.approx(0.0, abs=1e-12)
    assert abs(-np.pi + (j + 0.5) * d_alpha) <= d_alpha / 2 + 1e-12
    assert alpha_bin(r, -1e-6) == j - 1
    # just past -pi: bin 0; just before +pi: the last bin
    eps = 1e-4
    assert alpha_bin(r * np.cos(-np.pi + eps), r * np.sin(-np.pi + eps)) == 0
    assert alpha_bin(r * np.cos(np.pi - eps), r * np.sin(np.pi - eps)) == n_alpha - 1
    # every bin centre maps to its bin
    for k in range(n_alpha):
        a = -np.pi + (k + 0.5) * d_alpha
        assert alpha_bin(r * np.cos(a), r * np.sin(a)) == k


@pytest.mark.parametrize("name", ["calochallenge-3", "calochallenge-2"])
def test_points_outside_the_mesh_give_minus_one(name: str) -> None:
    g = get_geometry(name)
    outside = np.array([[41.86, 0.0, 10.0], [0.0, -42.0, 10.0], [30.0, 30.0, 10.0],  # r > 41.85
                        [1.0, 1.0, -0.01], [1.0, 1.0, 153.0], [1.0, 1.0, 160.0]])
    np.testing.assert_array_equal(g.cell_index(outside), -1)
    inside = np.array([[41.84, 0.0, 10.0], [0.0, 0.0, 0.0], [1.0, 1.0, 152.99]])
    cells = g.cell_index(inside)
    assert np.all(cells >= 0)
    assert g.cell_layer[cells[0]] == 2 and g.cell_layer[cells[1]] == 0 and g.cell_layer[cells[2]] == 44


def test_voxelise_reports_energy_outside_and_applies_threshold() -> None:
    g = get_geometry("calochallenge-2")
    threshold = g.energy.threshold_mev
    points = np.array([[1.0, 1.0, 5.0, 2.0], [1.0, 1.0, 5.0, 3.0],      # same cell, summed
                       [50.0, 0.0, 5.0, 7.0],                              # outside radially
                       [-5.0, 5.0, 20.0, 0.5 * threshold]])                # below threshold
    s = Showers(points, [0, 4], [1e3], geometry=g.name)
    voxels, outside = g.voxelise(s, return_outside=True)
    assert voxels.sum() == pytest.approx(5.0 + 0.5 * threshold)
    assert outside[0] == pytest.approx(7.0)
    assert g.voxelise(s, threshold=True).sum() == pytest.approx(5.0)


# -- custom YAML geometries ------------------------------------------------------------------------
CRYSTAL_YAML = """\
name: pbwo4-crystal
description: homogeneous PbWO4 crystal, 5 x 5 cells of 22 mm
particle: photon
stack:
  - {material: PbWO4, thickness_mm: 230, active: true}
layers: {segmentation: slices, slice_mm: 23.0}
readout: {kind: planar, pitch_mm: 22.0, n_x: 5, n_y: 5}
energy: {e_vis: 1.0, threshold_mev: 0.1}
shower: {sampling_term: 0.03}
"""

PB_SCINT_YAML = """\
name: pb-scint
particle: electron
stack:
  - repeat: 20
    slabs: [{material: Pb, thickness_mm: 2.0}, {material: Scintillator, thickness_mm: 4.0, active: true}]
layers: {segmentation: sensors}
readout: {kind: cylindrical, n_r: 10, dr_moliere: 0.5, n_alpha: 8}
energy: {e_vis: 1.0, threshold_mev: 0.01}
shower: {sampling_term: 0.1}
"""


def test_homogeneous_crystal_yaml(tmp_path: Path) -> None:
    path = tmp_path / "crystal.yaml"
    path.write_text(CRYSTAL_YAML)
    g = get_geometry(path)
    assert g.name == "pbwo4-crystal" and g.particle == "photon"
    assert g.n_layers == 10 and g.n_cells == 250
    assert rel(g.x0_mm, 8.903) and rel(g.shape_medium.z_eff, 68.36, 1e-6)
    assert not g.shape_medium.is_sampling
    np.testing.assert_allclose(g.layer_visible_fraction, 1.0)  # homogeneous: all deposited energy is seen
    np.testing.assert_array_equal(g.cell_index(g.cell_centres_mm), np.arange(g.n_cells))
    assert get_geometry(str(path)).n_cells == 250


def test_lead_scintillator_yaml(tmp_path: Path) -> None:
    path = tmp_path / "pb_scint.yml"
    path.write_text(PB_SCINT_YAML)
    g = get_geometry(path)
    assert g.n_layers == 20 and isinstance(g.readout, CylindricalReadout) and g.n_cells == 20 * 10 * 8
    # D / X0_eff = sum d_i / X0_i over one 6 mm sampling cell (reference §1.2)
    x0_cell = 2.0 / MATERIALS["Pb"].x0_mm + 4.0 / MATERIALS["Scintillator"].x0_mm
    assert g.x0_mm == pytest.approx(6.0 / x0_cell, rel=1e-9)
    assert g.shape_medium.sampling_frequency == pytest.approx(g.x0_mm / 6.0, rel=1e-9)
    mip = lambda name, d: MATERIALS[name].dedx_min_mev_cm2_g * MATERIALS[name].density_g_cm3 * d  # noqa: E731
    f_mip = mip("Scintillator", 4.0) / (mip("Scintillator", 4.0) + mip("Pb", 2.0))
    assert g.sampling_fraction == pytest.approx(f_mip, rel=1e-9)
    np.testing.assert_allclose(g.readout.r_edges_mm[0], 0.5 * g.moliere_radius_mm * np.arange(11))
    np.testing.assert_allclose(g.layer_centres_mm, 6.0 * np.arange(20) + 4.0)


def test_generic_mesh_is_in_x0_and_moliere_units() -> None:
    g = get_geometry("generic-mesh")
    np.testing.assert_allclose(np.diff(g.layer_edges_mm), 0.8 * g.stack.mixture().x0_mm)
    np.testing.assert_allclose(np.diff(g.readout.r_edges_mm[0]), 0.25 * g.moliere_radius_mm)
    assert g.n_cells == 45 * 18 * 50


# -- errors -----------------------------------------------------------------------------------------
def _one_line_geometry_error(path_or_name, *words: str) -> str:
    with pytest.raises(GeometryError) as info:
        get_geometry(path_or_name)
    message = str(info.value)
    assert "\n" not in message and message
    for word in words:
        assert word in message, (word, message)
    return message


def test_malformed_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n  stack: {\n")
    _one_line_geometry_error(path, "malformed", "bad.yaml")


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    _one_line_geometry_error(path, "list.yaml", "mapping")


def test_unknown_material(tmp_path: Path) -> None:
    path = tmp_path / "unobtainium.yaml"
    path.write_text(CRYSTAL_YAML.replace("PbWO4", "Unobtainium"))
    _one_line_geometry_error(path, "unknown material", "Unobtainium")


@pytest.mark.parametrize("text, field", [
    (CRYSTAL_YAML + "colour: red\n", "colour"),
    (CRYSTAL_YAML.replace("n_y: 5}", "n_y: 5, bogus: 1}"), "bogus"),
])
def test_unknown_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "extra.yaml"
    path.write_text(text)
    _one_line_geometry_error(path, field, "extra.yaml")


@pytest.mark.parametrize("missing", ["shower", "stack", "energy"])
def test_missing_required_field(tmp_path: Path, missing: str) -> None:
    lines = [line for line in CRYSTAL_YAML.splitlines() if not line.startswith(missing)
             and not (missing == "stack" and line.startswith("  - "))]
    path = tmp_path / "missing.yaml"
    path.write_text("\n".join(lines) + "\n")
    _one_line_geometry_error(path, missing, "missing.yaml")


def test_missing_yaml_file(tmp_path: Path) -> None:
    _one_line_geometry_error(tmp_path / "nowhere.yaml", "nowhere.yaml")


@pytest.mark.parametrize("text", ["<Bins><Bin>", "this is not xml", "<Bins></Bins>",
                                  '<Bins><Bin><Layer id="0" r_edges="0,a" n_bin_alpha="3"/></Bin></Bins>'])
def test_malformed_xml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broken.xml"
    path.write_text(text)
    _one_line_geometry_error(path, "broken.xml")


def test_unknown_geometry_name() -> None:
    message = _one_line_geometry_error("no-such-detector", "no-such-detector")
    for name in BUILTIN_GEOMETRIES:
        assert name in message


@pytest.mark.parametrize("n_showers", [3, 400])
def test_grouping_into_cells_matches_a_sort_of_the_cell_keys(n_showers, monkeypatch):
    """The table of cells (small batches of few cells) and the sort (every other case) give the same
    cells and the same map of points to them."""
    import caloadapt.geometry.geometry as module

    geometry = get_geometry("calochallenge-3")
    rng = np.random.default_rng(1)
    n = 2000
    points = np.stack([rng.normal(0, 15, n), rng.normal(0, 15, n),
                       rng.uniform(geometry.layer_edges_mm[0], geometry.layer_edges_mm[-1] + 20, n),
                       rng.uniform(1, 2, n)], axis=1)
    shower = np.sort(rng.integers(0, n_showers, n))
    cells = geometry.cell_index(points)
    inside = cells >= 0
    expected_keys, expected_inverse = np.unique(shower[inside] * geometry.n_cells + cells[inside],
                                                return_inverse=True)
    for table in (0, 1 << 24):  # the sort, then the table wherever the batch allows it
        monkeypatch.setattr(module, "_MAX_CELL_TABLE", table)
        got_inside, keys, inverse = geometry.group_into_cells(points, shower)
        np.testing.assert_array_equal(got_inside, inside)
        np.testing.assert_array_equal(keys, expected_keys)
        np.testing.assert_array_equal(inverse, expected_inverse.ravel())
