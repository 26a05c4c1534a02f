"""Test-suite settings: CI runs hypothesis derandomized, so a red CI is reproducible locally
with CI=true and never depends on which random examples one run happened to draw."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
