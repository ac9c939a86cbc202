"""Quantized weights: int8 and int4 weight-only matmuls, sharded like the float layers.

* :mod:`.config`: :class:`QuantConfig` and the ``--quant`` options (no torch);
* :mod:`.qtensor`: :class:`QTensor`, a weight quantized along its input dimension in groups
  (the canonical form: what readers return, what checkpoints store);
* :mod:`.grid`: how a rank's columns of a grouped tensor map onto a kernel's uniform groups
  (exact splits, re-quantized straddling groups);
* :mod:`.kernels`: :class:`QuantizedWeight`, the runtime form a layer multiplies with
  (shardwise's native ``qlinear`` on AVX-512 CPUs, :mod:`.native`; else torch's int8/int4
  kernels where they fit, dequantize-then-matmul where nothing does);
* :mod:`.load`: quantizing readers (a float checkpoint quantized on the global grid, then sliced)
  and the loader that installs each rank's quantized weights into a model.

This package imports nothing on import: :mod:`.config` and :mod:`.grid` are pure Python (the planner uses the grid).
"""
