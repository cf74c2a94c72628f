"""cascadegw: a dispatch gateway that delivers each message through the cheapest channel that works."""

__version__ = "0.1.0"
__all__ = ["__version__"]
