"""altgrad: low-precision float training for GPTs, measured against an FP32 shadow."""

__version__ = "0.1.0"
