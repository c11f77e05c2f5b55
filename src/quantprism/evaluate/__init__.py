"""Quality evaluation against the original model (KLD, top-1, PPL ratio, hard slices)."""
