"""The ``gpu-fp16`` target: Triton kernels on packed low-bit weights, fp16 activations, CUDA graphs."""
