"""MONAI Label tasks of the MedLSAM app (infer: medlam, sam, medlsam; train: medlam)."""
