"""Self-supervised MedLAM pretraining (RDR + MSS)."""
