"""The merge math: pure functions on tensors, and one registry mapping mergekit's names to them."""

from .registry import METHODS, Method, get_method

__all__ = ["METHODS", "Method", "get_method"]
