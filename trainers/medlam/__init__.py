"""MedLAM self-supervised pretraining: RDR + MSS on unlabeled CT (METHOD sections 4, 5).

    from trainers.medlam import TrainConfig, train
    path = train(TrainConfig(...), image_paths, out_dir)   # -> out_dir/medlam.pt
"""

from trainers.medlam.config import TrainConfig, demo_config
from trainers.medlam.loop import train

__all__ = ["TrainConfig", "demo_config", "train"]
