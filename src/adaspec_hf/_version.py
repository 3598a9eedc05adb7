"""The package version, in a leaf module (profile keys and exported files record it)."""
__version__ = "0.1.0"
