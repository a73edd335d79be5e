"""The engine: owns the device, executes forward batches. Knows nothing of inferlets."""
