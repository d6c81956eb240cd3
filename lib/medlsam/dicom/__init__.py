"""DICOM for the DICOMweb deployment: CT series and DICOM SEG writing/reading, Orthanc helpers.

    from medlsam.dicom import write_ct_series, write_seg, read_seg, write_dicom_dataset
"""

from .dataset import dataset_files, write_dicom_dataset
from .geometry import dicom_layout, sitk_from_nifti
from .seg import read_seg, referenced_series_uid, segment_names, write_seg
from .series import SeriesRef, write_ct_series
from .uids import derived_uid, study_uids

__all__ = [
    "SeriesRef", "dataset_files", "derived_uid", "dicom_layout", "read_seg", "referenced_series_uid",
    "segment_names", "sitk_from_nifti", "study_uids", "write_ct_series", "write_dicom_dataset", "write_seg",
]
