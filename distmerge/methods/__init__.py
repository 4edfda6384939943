"""Merge methods, registered by mergekit's names so mergekit configs carry over."""

from distmerge.methods.registry import METHODS, get_method

__all__ = ["METHODS", "get_method"]
