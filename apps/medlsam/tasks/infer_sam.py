"""Infer task `sam`: interactive box / point prompts, as 3D Slicer's and OHIF's plugins send them."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from medlsam.geometry import AxialView
from medlsam.io import save_nifti
from medlsam.segment import window_for_organ_name

from .context import MedLSAMContext
from .errors import bad_request, request_errors
from .requests import points_param, roi_param


class SAMInfer(InferTask):
    def __init__(self, ctx: MedLSAMContext):
        super().__init__(
            type=InferType.ANNOTATION,
            labels=ctx.label_ids,
            dimension=3,
            description=f"{ctx.settings.segmenter} from a box (roi [x0, y0, x1, y1, z0, z1]) and/or "
            "foreground/background points [[x, y, z], ...] in image voxels",
            config={"label": "", "window": ""},
        )
        self.ctx = ctx

    def is_valid(self) -> bool:
        return True

    def _label(self, request) -> tuple[str, int]:
        value = request.get("label")
        if value in (None, ""):
            return "object", 1
        name = self.ctx.organ_name(value)
        return name, self.ctx.label_ids[name]

    def __call__(self, request):
        started = time.perf_counter()
        with request_errors("sam"):
            image = self.ctx.load_image(self.ctx.image_path(request))
            roi = roi_param(request.get("roi"), image.shape)
            foreground = points_param(request, "foreground", image.shape)
            background = points_param(request, "background", image.shape)
            if roi is None and not foreground:
                raise bad_request("sam needs a prompt: an roi box and/or foreground points")
            name, label_id = self._label(request)
            window = request.get("window") or window_for_organ_name(name)
            view = AxialView.from_nifti(image)
            mask = np.zeros(view.array.shape, dtype=np.uint8)
            if roi is not None:
                lo, hi = view.box_from_original(*roi)
                lo = np.maximum(lo, 0)
                hi = np.minimum(hi, np.array(view.array.shape) - 1)
                z_range = range(lo[0], hi[0] + 1)
            else:
                lo = hi = None
                z_range = sorted({int(round(view.points_to_view(p)[0])) for p in foreground})
            fg_view = [view.points_to_view(p) for p in foreground]
            bg_view = [view.points_to_view(p) for p in background]
            segmenter = self.ctx.segmenter()
            slices = 0
            with self.ctx.segment_lock:
                for z in z_range:
                    fg = [p[1:] for p in fg_view if round(p[0]) == z]
                    bg = [p[1:] for p in bg_view if round(p[0]) == z]
                    if lo is None and not fg:
                        continue
                    box = None if lo is None else (lo[1], lo[2], hi[1], hi[2])
                    result = segmenter.segment_slice(view.array[z], box, fg, bg, window=window)
                    mask[z][result.mask] = label_id
                    slices += 1
        out = self.ctx.result_file()
        save_nifti(nib.Nifti1Image(view.to_original(mask), image.affine), out)
        return out, {
            "label_names": {name: label_id},
            "slices": slices,
            "voxels": int((mask > 0).sum()),
            "timings": {"total_s": round(time.perf_counter() - started, 3)},
        }
