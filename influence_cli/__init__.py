"""infl: audit labelled training data with influence functions (EK-FAC)."""

__version__ = "0.1.0"
