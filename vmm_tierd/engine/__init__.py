"""The tiering engine: policy (pure), store, and the per-region trio tasks."""
