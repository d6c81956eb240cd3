"""MedLAM: the 3D localization network, its checkpoints, templates and query localization."""
