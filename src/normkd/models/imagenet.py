"""ImageNet models (placeholder, filled in by the zoo work)."""
