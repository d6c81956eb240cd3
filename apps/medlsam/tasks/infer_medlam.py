"""Infer task `medlam`: organ boxes (localization only) from the supports, by the request's localizer
(`localizer`: medlam, registration or auto; tasks/localizers.py)."""

from __future__ import annotations

import nibabel as nib
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from medlsam.io import save_nifti
from medlsam.medlam.box_volume import boxes_to_label_volume

from .context import MedLSAMContext
from .errors import request_errors


class MedLAMInfer(InferTask):
    def __init__(self, ctx: MedLSAMContext):
        super().__init__(
            # SEGMENTATION, listed after medlsam: 3D Slicer's Submit Label sends ROI markups instead of
            # the segments while a detection model is selected
            type=InferType.SEGMENTATION,
            labels=ctx.client_labels,
            dimension=3,
            description="MedLAM: the 3D box of each organ from a few annotated supports, drawn as a label "
            "volume (no prompt needed); `localizer`: medlam, registration or auto",
            config={"organs": "", "mode": ctx.settings.mode, "seed": 0, "mss": True,
                    "localizer": ctx.settings.localizer},
        )
        self.ctx = ctx

    def is_valid(self) -> bool:
        return True

    def __call__(self, request):
        with request_errors("medlam"):
            image, organs, mode, seed = self.ctx.localization_request(request)
            localization = self.ctx.localizer(request).localize(image, organs=organs, mode=mode, seed=seed)
        volume, names = self.ctx.client_volume(boxes_to_label_volume(localization, image.shape))
        out = self.ctx.result_file()
        save_nifti(nib.Nifti1Image(volume, image.affine), out)
        return out, {**localization.to_json(), **names, "timings": localization.timings}
