"""Pytest setup: the host and the pack are loaded once, in-process, by the harness."""

import harness  # noqa: F401  (loads ComfyUI and the pack)
