"""Audit layer: ranking and flagging of training examples, CSV/JSON/HTML reports, CI checks.

Pure code: it receives numpy arrays and pandas frames and writes files or renders tables;
it never trains models or computes gradients.
"""
