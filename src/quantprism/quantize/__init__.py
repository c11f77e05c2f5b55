"""The canonical stage: calibration statistics, transforms, grids, GPTQ/RTN, mixed precision."""
