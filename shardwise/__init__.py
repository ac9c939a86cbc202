"""shardwise: tensor parallelism for PyTorch that you can read, run on a laptop CPU, and deploy."""
from .mesh import Mesh
from .partition import HeadLayout, Partition, split_sizes, vocab_partition

__all__ = ["Mesh", "Partition", "HeadLayout", "split_sizes", "vocab_partition"]
__version__ = "0.1.0"
