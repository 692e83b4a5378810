"""blockmirror: remote block-level data mirroring."""

__version__ = "0.1.0"
COPYRIGHT = "Copyright (c) 2026 the blockmirror developers. Licensed under the Apache License 2.0."
