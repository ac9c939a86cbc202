"""3D-parallel training: TP (shardwise layers) x PP (torch.distributed.pipelining) x DP (DDP).

``train(TrainConfig(...))`` runs it from Python; ``shardwise train`` / ``python -m shardwise.train``
from the command line; ``export_hf`` and ``reshard`` convert its checkpoints.
"""
from .config import TrainConfig
from .convert import export_hf, reshard
from .run import train

__all__ = ["TrainConfig", "train", "export_hf", "reshard"]
