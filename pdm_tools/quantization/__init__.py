"""Our own weight-only quantization: GPTQ and round-to-nearest in numpy, packed into ONNX Runtime's MatMulNBits.

``gptq`` turns a layer's float weight (and the Hessian of its inputs) into a ``BlockQuantized``; ``nbits``
finds the MatMul weights of a graph, records their inputs and writes the 4-bit ``MatMulNBits`` graph.
"""

from pdm_tools.quantization.gptq import BlockQuantized, gptq_quantize, hessian, output_error, rtn_quantize
from pdm_tools.quantization.nbits import matmul_inputs, matmul_weights, pack_matmul_nbits, to_matmul_nbits

__all__ = [
    "BlockQuantized",
    "gptq_quantize",
    "hessian",
    "matmul_inputs",
    "matmul_weights",
    "output_error",
    "pack_matmul_nbits",
    "rtn_quantize",
    "to_matmul_nbits",
]
