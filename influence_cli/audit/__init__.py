"""Audit layer: ranking and flagging of training examples, and the CI check's decision.

Pure code: it receives numpy arrays and pandas frames and returns frames and results; it
never trains models, computes gradients, writes files or renders anything (that is
:mod:`influence_cli.render`).
"""
