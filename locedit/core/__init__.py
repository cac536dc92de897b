"""The shared core: model adapters, loading, facts, the intervention engine, datasets, plots."""
