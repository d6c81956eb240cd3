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
            labels=ctx.label_ids,
            dimension=3,
            description="MedLSAM: localize every organ with MedLAM, segment it slice by slice with "
            f"{ctx.settings.segmenter} box prompts",
            config={"organs": "", "mode": ctx.settings.mode, "seed": 0},
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
        out = self.ctx.result_file()
        save_nifti(nib.Nifti1Image(result.labels, image.affine), out)
        return out, result.report()
