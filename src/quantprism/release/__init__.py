"""The release pipeline around a build: artifact manifests and `verify`, `stale` (what must be rebuilt and why),
`drift` (has traffic moved away from the calibration set), `report --merge` of per-hardware CI jobs, the GitHub
Actions workflow generated from targets.toml, and `bundle` (what ships, with a model card)."""
