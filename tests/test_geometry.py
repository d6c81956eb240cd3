"""Geometry round trips: study voxels <-> MedLAM grid <-> world, and the axial view."""

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio

from medlsam.geometry import AxialView, MedLAMGrid, map_hu


def make_study(axcodes: str, spacing=(0.8, 1.1, 2.5), shape=(90, 80, 70), blob_ijk=(20, 55, 40)):
    """A CT-like volume (air + one bright blob) in the given orientation."""
    data = np.full(shape, -1000, dtype=np.int16)
    i, j, k = blob_ijk
    data[i - 2 : i + 3, j - 2 : j + 3, k - 1 : k + 2] = 1200
    ornt = nio.axcodes2ornt(tuple(axcodes))
    affine = np.eye(4)
    for axis, (world_axis, sign) in enumerate(ornt.astype(int)):
        affine[:3, axis] = 0
        affine[world_axis, axis] = sign * spacing[axis]
    affine[:3, 3] = [-30.0, 12.0, 7.0]
    return nib.Nifti1Image(data, affine)


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "LAS", "RPI", "PIR"])
def test_point_round_trip_within_half_voxel(axcodes):
    img = make_study(axcodes)
    grid = MedLAMGrid.from_nifti(img, spacing_mm=(3.0, 3.0, 3.0), patch_size=(16, 16, 16))
    rng = np.random.default_rng(0)
    points = rng.uniform(0, np.array(img.shape) - 1, size=(50, 3))
    back = grid.to_original(grid.from_original(points))
    assert np.abs(back - points).max() < 1e-6
    # world coordinates agree with the study's own affine
    world = grid.to_world(grid.from_original(points))
    assert np.allclose(world, nib.affines.apply_affine(img.affine, points), atol=1e-6)
    # the grid is LAS (z, y, x): z grows superior, y anterior, x patient left
    steps = grid.to_world(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])) 
    d = steps[1:] - steps[0]
    assert d[0][2] == pytest.approx(3.0) and d[1][1] == pytest.approx(3.0) and d[2][0] == pytest.approx(-3.0)


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "RPI"])
def test_image_content_lands_where_the_map_says(axcodes):
    blob = (20, 55, 40)
    img = make_study(axcodes, blob_ijk=blob)
    grid = MedLAMGrid.from_nifti(img, spacing_mm=(3.0, 3.0, 3.0), patch_size=(16, 16, 16))
    expected = grid.from_original(np.array(blob, dtype=float))
    found = np.array(np.unravel_index(np.argmax(grid.array), grid.array.shape), dtype=float)
    # within one grid voxel (3 mm) of the mapped position
    assert np.abs(found - expected).max() <= 1.0
    assert grid.array.shape[0] >= 16 and grid.array.dtype == np.float32
    assert 0.0 <= grid.array.min() and grid.array.max() <= 1.0


def test_hu_map_knots():
    values = map_hu(np.array([-2000, -1000, -200, 0, 200, 1500, 3000], dtype=np.float32))
    assert np.allclose(values, [0, 0, 0.2, 0.5, 0.8, 1.0, 1.0])


def test_non_ct_and_2d_inputs_are_refused():
    img = make_study("RAS")
    mr = nib.Nifti1Image(np.abs(np.asanyarray(img.dataobj)).astype(np.int16), img.affine)
    with pytest.raises(ValueError, match="Hounsfield"):
        MedLAMGrid.from_nifti(mr)
    flat = nib.Nifti1Image(np.zeros((64, 64), dtype=np.int16) - 1000, np.eye(4))
    with pytest.raises(ValueError, match="3D"):
        MedLAMGrid.from_nifti(flat)


def test_volume_smaller_than_half_a_patch_is_refused():
    img = make_study("RAS", shape=(30, 30, 20), blob_ijk=(10, 10, 10))  # 24 x 33 x 50 mm
    with pytest.raises(ValueError, match="too small"):
        MedLAMGrid.from_nifti(img, spacing_mm=(3.0, 3.0, 3.0), patch_size=(64, 64, 64))


def test_padding_to_patch_keeps_indices():
    img = make_study("RAS", shape=(80, 80, 50), spacing=(1.5, 1.5, 2.5))
    grid = MedLAMGrid.from_nifti(img, spacing_mm=(3.0, 3.0, 3.0), patch_size=(64, 64, 64))
    assert grid.array.shape == (64, 64, 64)
    assert all(v < 64 for v in grid.valid_shape)
    assert grid.array[grid.valid_shape[0]:].max() == 0.0


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PIR"])
def test_axial_view_box_and_mask_round_trip(axcodes):
    img = make_study(axcodes)
    view = AxialView.from_nifti(img)
    data = np.asanyarray(img.dataobj)
    assert view.to_original(view.array).shape == data.shape
    assert np.array_equal(view.to_original(view.array), data.astype(np.float32))
    lo, hi = np.array([10, 20, 30]), np.array([40, 50, 60])
    vlo, vhi = view.box_from_original(lo, hi)
    blo, bhi = view.box_to_original(vlo, vhi)
    assert np.array_equal(blo, lo) and np.array_equal(bhi, hi)
    # the view is LPS: x grows to patient left (world -x in RAS+), y posterior, z superior
    steps = nib.affines.apply_affine(
        view.study_affine @ view.to_original_matrix, np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    )
    d = steps[1:] - steps[0]
    assert d[0][2] > 0 and d[1][1] < 0 and d[2][0] < 0
