"""spotlight_model: authoring side of spotlight (nested-feature network -> model package)."""

__version__ = "0.1.0"
