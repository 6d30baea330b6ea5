"""ssse: erase training samples from a trained model in one closed-form step."""
