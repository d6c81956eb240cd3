"""Infer task `medlsam`: localize the organs, then segment them with box prompts (the headline)."""

from __future__ import annotations

import nibabel as nib
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from medlsam.io import save_nifti
from medlsam.pipeline import run_medlsam

from .context import MedLSAMContext
from .errors import request_errors


class MedLSAMInfer(InferTask):
    def __init__(self, ctx: MedLSAMContext):
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=ctx.client_labels,
            dimension=3,
            description="MedLSAM: localize every organ (MedLAM or registration of the supports), segment it slice by slice with "
            f"{ctx.settings.segmenter} box prompts",
            config={"organs": "", "mode": ctx.settings.mode, "seed": 0, "localizer": ctx.settings.localizer},
        )
        self.ctx = ctx

    def is_valid(self) -> bool:
        return True

    def __call__(self, request):
        with request_errors("medlsam"):
            image, organs, mode, seed = self.ctx.localization_request(request)
            localizer = self.ctx.localizer(request)
            with self.ctx.segment_lock:
                result = run_medlsam(image, localizer, self.ctx.segmenter(), organs=organs, mode=mode, seed=seed)
        volume, names = self.ctx.client_volume(result.labels)
        out = self.ctx.result_file()
        save_nifti(nib.Nifti1Image(volume, image.affine), out)
        return out, {**result.report(), **names}
