"""Infer task `medlam`: organ boxes (localization only) from the support templates."""

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
            type=InferType.DETECTION,
            labels=ctx.label_ids,
            dimension=3,
            description="MedLAM: 3D box of each organ from a few annotated supports (no prompt needed)",
            config={"organs": "", "mode": ctx.settings.mode, "seed": 0, "mss": True},
        )
        self.ctx = ctx

    def is_valid(self) -> bool:
        return True

    def __call__(self, request):
        with request_errors("medlam"):
            image, organs, mode, seed = self.ctx.localization_request(request)
            localization = self.ctx.localizer(request).localize(image, organs=organs, mode=mode, seed=seed)
        out = self.ctx.result_file()
        save_nifti(nib.Nifti1Image(boxes_to_label_volume(localization, image.shape), image.affine), out)
        return out, {**localization.to_json(), "timings": localization.timings}
