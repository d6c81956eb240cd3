"""MedLSAM: localize (MedLAM) and segment (SAM family) anything in 3D CT."""

__version__ = "0.1.0"
