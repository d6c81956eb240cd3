"""Infer tasks `sam` (3D) and `sam_2d`: interactive box / point prompts, as 3D Slicer's SmartEdit and
OHIF's Point Prompts send them.

Both are registered as `deepgrow` models, the type those clients list for interactive segmentation.
Prompts, all in the study's voxel indices (i, j, k):
- `roi`: 3D Slicer's layout [i_a, i_b, j_a, j_b, k_a, k_b] (each pair in either order, clamped);
  `box`: the same box in corner order [i0, j0, k0, i1, j1, k1], for REST callers;
- `foreground` / `background`: [[i, j, k], ...];
- `slice` (sam_2d): the k index of the slice to segment;
- `label`: the segment's name, any name (it only picks the CT window and names the result).
Clicks without a box get a box grown from the clicked tissue (`medlsam.segment.point_box`): the
box-trained LiteMedSAM answers a lone click with an empty mask.
The result is a binary mask (1 = the object), `label_names` {label: 1}: 3D Slicer puts value 1 into
the selected segment, OHIF into the selected label.
"""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from medlsam.geometry import AxialView
from medlsam.io import save_nifti
from medlsam.segment import window_for_organ_name
from medlsam.segment.point_box import box_from_clicks

from .context import MedLSAMContext
from .errors import bad_request, request_errors
from .requests import box_param, points_param, roi_param, slice_param

DEFAULT_NAME = "object"  # OHIF's point prompts send no label


class SAMInfer(InferTask):
    """`sam`: 3D. With a box, every axial slice of the box; with points only, the slices holding points."""

    dimension = 3

    def __init__(self, ctx: MedLSAMContext):
        what = ("one slice: `slice` (else the points' slice, else the box's middle slice)" if self.dimension == 2
                else "every slice of the box (roi), or the slices of the points")
        super().__init__(
            type=InferType.DEEPGROW,
            labels=ctx.client_labels,
            dimension=self.dimension,
            description=f"{ctx.settings.segmenter} from an ROI box and/or foreground/background points, {what}",
            # never `label` or prompt keys here: 3D Slicer sends these config values after its own params
            config={"window": ""},
        )
        self.ctx = ctx

    def is_valid(self) -> bool:
        return True

    def __call__(self, request):
        started = time.perf_counter()
        with request_errors(self.name()):
            image = self.ctx.load_image(self.ctx.image_path(request))
            prompt = Prompt.parse(request, image.shape)
            name = str(request.get("label") or "").strip() or DEFAULT_NAME
            window = str(request.get("window") or "") or window_for_organ_name(name)
            view = AxialView.from_nifti(image)
            plan = self.plan(prompt, view, request)
            segmenter = self.ctx.segmenter()
            mask = np.zeros(view.array.shape, dtype=np.uint8)
            with self.ctx.segment_lock:
                for z, box, fg, bg in plan:
                    mask[z][segmenter.segment_slice(view.array[z], box, fg, bg, window=window).mask] = 1
        out = self.ctx.result_file()
        save_nifti(nib.Nifti1Image(view.to_original(mask), image.affine), out)
        voxels = int(mask.sum())
        return out, {
            "label_names": {name: 1},
            "label_info": [{"name": name, "idx": 1}] if voxels else [],
            "slices": len(plan),
            "slice_indices": sorted(int(view_k(view, z)) for z, *_ in plan) if self.dimension == 2 else None,
            "voxels": voxels,
            "timings": {"total_s": round(time.perf_counter() - started, 3)},
        }

    def name(self) -> str:
        return "sam_2d" if self.dimension == 2 else "sam"

    def plan(self, prompt: "Prompt", view: AxialView, request) -> list[tuple]:
        """[(view slice z, box (y0, x0, y1, x1) or None, fg [(y, x)], bg [(y, x)])] to segment."""
        if prompt.box is None and not prompt.foreground:
            raise bad_request(f"{self.name()} needs a prompt: an roi (or box) and/or foreground points")
        fg = [view.points_to_view(p) for p in prompt.foreground]
        bg = [view.points_to_view(p) for p in prompt.background]
        if prompt.box is not None:
            lo, hi = view.box_from_original(*prompt.box)
            lo = np.maximum(lo, 0)
            hi = np.minimum(hi, np.array(view.array.shape) - 1)
            slices = range(int(lo[0]), int(hi[0]) + 1)
            box = (lo[1], lo[2], hi[1], hi[2])
        else:
            slices = sorted({int(round(p[0])) for p in fg})
            box = None
        plan = []
        for z in slices:
            fz = [p[1:] for p in fg if round(p[0]) == z]
            bz = [p[1:] for p in bg if round(p[0]) == z]
            if box is not None:
                plan.append((z, box, fz, bz))
            elif fz:  # clicks only: LiteMedSAM / MedSAM need a box, grown from the clicked tissue
                plan.append((z, box_from_clicks(view.array[z], fz, bz, view.spacing_zyx[1:]), fz, bz))
        return plan


class SAM2DInfer(SAMInfer):
    """`sam_2d`: one axial slice, as 3D Slicer's 2D SmartEdit and OHIF's 2D point prompts ask."""

    dimension = 2

    def plan(self, prompt: "Prompt", view: AxialView, request) -> list[tuple]:
        axis = slice_axis(view)
        if axis is None:
            raise bad_request("sam_2d segments axial slices, and this volume's k axis is not its axial (head-foot) "
                              "axis: use `sam` (3D) with a box")
        k = self.choose_slice(prompt, slice_param(request.get("slice")), view.study_shape[2])
        z = int(round(view.points_to_view([0, 0, k])[0]))
        box = prompt.box
        if box is not None and not box[0][2] <= k <= box[1][2]:
            box = None  # the slice lies outside the ROI: points only
        on_slice = Prompt(box=None if box is None else ([box[0][0], box[0][1], k], [box[1][0], box[1][1], k]),
                          foreground=[p for p in prompt.foreground if p[2] == k],
                          background=[p for p in prompt.background if p[2] == k])
        if on_slice.box is None and not on_slice.foreground:
            raise bad_request(f"sam_2d: slice k={k} has no foreground point and lies outside the roi")
        plan = super().plan(on_slice, view, request)
        return [step for step in plan if step[0] == z]

    @staticmethod
    def choose_slice(prompt: "Prompt", requested: int | None, depth: int) -> int:
        """`slice` if it is a slice of the image (and of the ROI, if any); else the k of the last
        foreground (else background) point; else the ROI's middle slice. 3D Slicer sends a millimetre
        offset as `slice` when only an ROI is placed, hence the checks."""
        box = prompt.box
        if requested is not None and 0 <= requested < depth and (box is None or box[0][2] <= requested <= box[1][2]):
            return requested
        points = prompt.foreground or prompt.background
        if points:
            return int(points[-1][2])
        if box is not None:
            return (box[0][2] + box[1][2]) // 2
        raise bad_request("sam_2d needs a slice: a `slice` index, a point or an roi")


class Prompt:
    """A request's prompts in study voxel indices (box inclusive and clamped to the image)."""

    def __init__(self, box=None, foreground=(), background=()):
        self.box = box
        self.foreground = list(foreground)
        self.background = list(background)

    @classmethod
    def parse(cls, request: dict, shape) -> "Prompt":
        roi = roi_param(request.get("roi"), shape)
        box = box_param(request.get("box"), shape)
        if roi is not None and box is not None:
            raise bad_request("give either roi (3D Slicer's [i_a, i_b, j_a, j_b, k_a, k_b]) or box "
                              "([i0, j0, k0, i1, j1, k1]), not both")
        return cls(roi if roi is not None else box, points_param(request, "foreground", shape),
                   points_param(request, "background", shape))


def slice_axis(view: AxialView) -> int | None:
    """2 if the view's axial slices are the study's k slices, else None."""
    z_to_ijk = np.abs(np.asarray(view.to_original_matrix)[:3, 0])
    return 2 if z_to_ijk[2] > 0.5 and z_to_ijk[0] < 1e-6 and z_to_ijk[1] < 1e-6 else None


def view_k(view: AxialView, z: int) -> int:
    """The study's k index of view slice z (when the axial axis is k)."""
    return int(round(np.asarray(view.to_original_matrix)[2] @ np.array([z, 0, 0, 1.0])))
