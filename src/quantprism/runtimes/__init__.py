"""Runtime adapters: load an artifact, generate, teacher-forced logits. One protocol for every runtime."""
