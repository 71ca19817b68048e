"""Data sets: PTB (word-level LM), IWSLT14 / Multi30k translation; download and cache helpers.

Torch-free: loaders return numpy arrays and plain Python vocabularies.
"""
