"""The numerical solvers behind the ``exact`` and ``lissa`` strategies (imported when they
fit or load, so that listing strategies does not import torch)."""
