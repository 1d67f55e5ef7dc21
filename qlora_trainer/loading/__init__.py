"""The base model: 4-bit loading, the checks it must pass, its weight fingerprint, known configs, the demo model."""
