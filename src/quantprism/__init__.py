"""quantprism: one canonical quantization stage, exported to every runtime, proven in each."""

__version__ = "0.1.0"
