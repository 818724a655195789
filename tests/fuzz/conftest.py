"""Loads the fuzz profile before any target module builds its settings."""

import tests.fuzz.profiles  # noqa: F401
