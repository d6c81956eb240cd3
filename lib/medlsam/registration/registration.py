"""Register a support study to a query: z-offset search -> similarity -> affine (-> coarse B-spline).

The transform maps query (fixed) LPS points to support (moving) LPS points, SimpleITK's
convention, which is what resampling a support label onto the query grid needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .preprocessing import PreparedImage

logger = logging.getLogger(__name__)


@dataclass
class RegistrationSettings:
    spacing_mm: float = 4.0  # registration grid (isotropic)
    clamp_hu: tuple[float, float] = (-1000.0, 1000.0)
    shrink_factors: tuple[int, ...] = (2, 1)  # multi-resolution levels of the linear stages
    smoothing_mm: tuple[float, ...] = (4.0, 0.0)
    histogram_bins: int = 32
    samples: int = 20000  # metric samples per iteration (random, inside the query's body mask)
    similarity_iterations: int = 60  # rotation, isotropic scale, translation
    affine_iterations: int = 60
    bspline: bool = False  # coarse deformable stage: costly and not better on average (see the study)
    bspline_mesh_mm: float = 80.0  # control-point spacing of the deformable stage
    bspline_shrink_factors: tuple[int, ...] = (2,)
    bspline_smoothing_mm: tuple[float, ...] = (4.0,)
    bspline_iterations: int = 20
    z_search: bool = True  # initial z offset from slice descriptors (fields of view may differ)
    min_overlap_mm: float = 40.0  # smallest z overlap the initial search considers
    overlap_preference: float = 0.1  # score bonus of a full overlap over a minimal one
    seed: int = 0

    def cache_key(self) -> dict:
        """The settings a prepared (cached) image depends on."""
        return {"spacing_mm": float(self.spacing_mm), "clamp_hu": [float(v) for v in self.clamp_hu]}


@dataclass
class RegistrationResult:
    transform: sitk.Transform  # query LPS point -> support LPS point
    affine: sitk.Transform  # the linear part alone
    z_offset_mm: float  # from the slice-descriptor search
    overlap_mm: tuple[float, float]  # query z range (LPS) the support covers after the initial search
    metric: dict = field(default_factory=dict)  # final metric value per stage


def z_offset_search(fixed: PreparedImage, moving: PreparedImage, settings: RegistrationSettings) -> tuple[float, float]:
    """The z translation (mm, fixed z -> moving z) whose overlapping axial slices look most alike, and
    its overlap length in mm. Fields of view may differ (chest vs abdomen-pelvis), so every whole-slice
    offset with at least `min_overlap_mm` of overlap (or 90% of the shorter study) is scored by the
    mean normalised cross-correlation of the slice descriptors, with a slight preference for longer
    overlaps (a short one matches by chance more easily)."""
    step = float(fixed.grid.spacing[2])
    if not np.isclose(step, moving.grid.spacing[2]):
        raise ValueError("fixed and moving images must share the slice spacing")
    ff, fm = fixed.slices, moving.slices
    vf, vm = np.any(ff != 0, axis=1), np.any(fm != 0, axis=1)
    similarity = ff @ fm.T  # (nf, nm) slice-to-slice correlation
    nf, nm = len(ff), len(fm)
    shorter = max(1, min(int(vf.sum()), int(vm.sum())))
    min_overlap = max(2, int(np.ceil(min(settings.min_overlap_mm / step, 0.9 * shorter))))
    best = (-np.inf, 0, 0)
    for d in range(-nf, nm + 1):  # moving slice j = fixed slice i + d
        i = np.arange(max(0, -d), min(nf, nm - d))
        if len(i) == 0:
            continue
        i = i[vf[i] & vm[i + d]]
        n = len(i)
        if n < min_overlap:
            continue
        score = float(similarity[i, i + d].mean()) - settings.overlap_preference * (1.0 - n / shorter)
        if score > best[0]:
            best = (score, d, n)
    _, d, n = best
    of, om = fixed.grid.origin[2], moving.grid.origin[2]
    return float(om - of + d * step), float(n * step)


def _body_centroid(prepared: PreparedImage, z_lo: float, z_hi: float) -> np.ndarray:
    """LPS centroid of the body mask between two z values (the whole mask if the slab is empty)."""
    body = sitk.GetArrayViewFromImage(prepared.body)  # (z, y, x)
    grid = prepared.grid
    z = grid.origin[2] + np.arange(body.shape[0]) * grid.spacing[2]
    slab = (z >= z_lo) & (z <= z_hi)
    idx = np.argwhere(body[slab] if slab.any() else body)
    if len(idx) == 0:
        return grid.origin + (grid.size - 1) * grid.spacing / 2
    zyx = idx.mean(axis=0)
    if slab.any():
        zyx[0] += np.flatnonzero(slab)[0]
    return grid.origin + zyx[::-1] * grid.spacing


def initial_translation(fixed: PreparedImage, moving: PreparedImage, settings: RegistrationSettings):
    """Translation (fixed -> moving) from the slice-descriptor z search and the body centroids of the overlap."""
    fg, mg = fixed.grid, moving.grid
    f_lo, f_hi = fg.origin[2], fg.origin[2] + (fg.size[2] - 1) * fg.spacing[2]
    m_lo, m_hi = mg.origin[2], mg.origin[2] + (mg.size[2] - 1) * mg.spacing[2]
    if settings.z_search:
        tz, _ = z_offset_search(fixed, moving, settings)
    else:
        tz = (m_lo + m_hi) / 2 - (f_lo + f_hi) / 2
    z0, z1 = max(f_lo, m_lo - tz), min(f_hi, m_hi - tz)  # overlap in fixed z
    if z1 <= z0:
        z0, z1 = f_lo, f_hi
    cf = _body_centroid(fixed, z0, z1)
    cm = _body_centroid(moving, z0 + tz, z1 + tz)
    t = cm - cf
    t[2] = tz
    return t, cf, (float(z0), float(z1))


def _overlap_mask(fixed: PreparedImage, z_range: tuple[float, float], margin_mm: float) -> sitk.Image:
    """Query body mask limited to the z range the support covers (metric samples only there)."""
    body = sitk.GetArrayFromImage(fixed.body)
    grid = fixed.grid
    z = grid.origin[2] + np.arange(body.shape[0]) * grid.spacing[2]
    body[(z < z_range[0] - margin_mm) | (z > z_range[1] + margin_mm)] = 0
    if body.sum() < 100:  # nothing left: fall back to the whole body
        body = sitk.GetArrayFromImage(fixed.body)
    mask = sitk.GetImageFromArray(body)
    mask.CopyInformation(fixed.body)
    return mask


def _method(settings: RegistrationSettings, mask: sitk.Image, shrink, smoothing) -> sitk.ImageRegistrationMethod:
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    r.SetMetricSamplingStrategy(r.RANDOM)
    # a fixed number of samples per level, whatever the size of the query
    in_mask = float(sitk.GetArrayViewFromImage(mask).sum())
    r.SetMetricSamplingPercentagePerLevel(
        [float(min(1.0, settings.samples * f**3 / max(in_mask, 1.0))) for f in shrink], settings.seed)
    r.SetMetricFixedMask(mask)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetShrinkFactorsPerLevel(list(shrink))
    r.SetSmoothingSigmasPerLevel(list(smoothing))
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return r


def _plain(transform: sitk.Transform) -> sitk.Transform:
    """The concrete transform inside what ImageRegistrationMethod returns."""
    transform = transform.Downcast()
    while isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1:
        transform = transform.GetNthTransform(0).Downcast()
    return transform


def _linear_stage(fixed, moving, mask, initial: sitk.Transform, iterations: int, settings) -> tuple[sitk.Transform, float]:
    r = _method(settings, mask, settings.shrink_factors, settings.smoothing_mm)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                               relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetInitialTransform(initial, inPlace=False)
    out = _plain(r.Execute(fixed.image, moving.image))
    return out, float(r.GetMetricValue())


def _bspline_stage(fixed, moving, mask, linear: sitk.Transform, settings) -> tuple[sitk.Transform, float]:
    size = np.asarray(fixed.image.GetSize()) * np.asarray(fixed.image.GetSpacing())
    mesh = [int(max(1, round(s / settings.bspline_mesh_mm))) for s in size]
    bspline = sitk.BSplineTransformInitializer(fixed.image, mesh, order=3)
    r = _method(settings, mask, settings.bspline_shrink_factors, settings.bspline_smoothing_mm)
    r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=settings.bspline_iterations,
                           maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * settings.bspline_iterations)
    r.SetMovingInitialTransform(linear)
    r.SetInitialTransform(bspline, inPlace=True)
    r.Execute(fixed.image, moving.image)
    # the B-spline as a displacement field on the query grid: the same mapping, far cheaper to
    # evaluate when whole label volumes are warped (zero displacement outside: the affine alone)
    field = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, fixed.image.GetSize(),
                                              fixed.image.GetOrigin(), fixed.image.GetSpacing(),
                                              fixed.image.GetDirection())
    deformation = sitk.DisplacementFieldTransform(field)
    # moving point = linear(deformation(fixed point)): the composite applies its last transform first
    return sitk.CompositeTransform([linear, deformation]), float(r.GetMetricValue())


def register(fixed: PreparedImage, moving: PreparedImage, settings: RegistrationSettings | None = None) -> RegistrationResult:
    """Register `moving` (a support) to `fixed` (the query)."""
    s = settings or RegistrationSettings()
    t, centre, overlap = initial_translation(fixed, moving, s)
    mask = _overlap_mask(fixed, overlap, margin_mm=2 * s.spacing_mm)
    metric = {}
    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(centre.tolist())
    similarity.SetTranslation(t.tolist())
    if s.similarity_iterations:
        similarity, metric["similarity"] = _linear_stage(fixed, moving, mask, similarity, s.similarity_iterations, s)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    if s.affine_iterations:
        affine, metric["affine"] = _linear_stage(fixed, moving, mask, affine, s.affine_iterations, s)
    final: sitk.Transform = affine
    if s.bspline:
        final, metric["bspline"] = _bspline_stage(fixed, moving, mask, affine, s)
    return RegistrationResult(final, affine, float(t[2]), overlap, metric)
