"""What follows a run: export (merge and verify), serving several adapters, and generation."""
