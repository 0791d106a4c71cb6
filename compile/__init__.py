"""The compile engine. Imports nothing from webui; ``scripts/onediff.py`` adapts webui's objects to it."""
from .engine import CompiledUNet, CompileStats, describe_failure
from .options import CompileOptions
from .structure import structure_key

__all__ = ["CompiledUNet", "CompileStats", "CompileOptions", "describe_failure", "structure_key"]
