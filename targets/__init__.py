"""Deployment backends for g2quant (imported as ``g2quant.targets``).

Nothing in this package imports torch: artifacts are written and run with numpy,
safetensors and numba only, so the CPU engine runs on machines without torch.
"""
