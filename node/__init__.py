"""The idlefleet application: node lifecycle, vehicle state, model shards, CLI."""
