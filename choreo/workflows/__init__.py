"""Workflows written once against the executor API (``choreo.Session``); the executor picks the arm."""
