"""Test-wide settings."""

import os

# See ckptdiff.cli.main: spinning OpenMP waits make CPU SVDs crawl on a shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
