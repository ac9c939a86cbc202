"""3D-parallel training: TP (shardwise layers) x PP (torch.distributed.pipelining) x DP (DDP or
ZeRO-1/2).

``train(TrainConfig(...))`` runs it from Python; ``shardwise train`` / ``python -m shardwise.train``
from the command line. Its checkpoints are the one sharded format of ``shardwise.checkpoint``:
``shardwise convert`` (``shardwise.checkpoint.convert.reshard`` / ``export_hf``) converts them.
"""
from .config import TrainConfig
from .run import train

__all__ = ["TrainConfig", "train"]
