"""Arguments every quality benchmark shares, so each runs unchanged on any local model."""
from __future__ import annotations

import argparse
from pathlib import Path


def quality_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--model", default=None, help="local HF model directory (default: bundled)")
    ap.add_argument("--calibration", default=None, help="calibration .txt/.jsonl/dir (default: bundled)")
    ap.add_argument("--eval-text", default=None, help="held-out text (default: bundled)")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--eval-chunks", type=int, default=64, help="512-token chunks of the eval text to score")
    return ap
