"""Backends run one trial each behind the ``Backend`` protocol (base.py)."""
