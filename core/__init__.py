"""Shared routines of renderqa: pure functions and result dataclasses, no CLI code."""
