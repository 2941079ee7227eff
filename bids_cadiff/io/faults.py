"""Test-only fault injection: the process kills itself (SIGKILL) at a named point.

The kill tests (``tests/app/test_kill.py``) need to stop a participant run at a precise moment,
as a pre-empted node or the OOM killer would, and then check what a rerun makes of what was
left. Polling for files from outside cannot hit a moment that lasts microseconds (a temporary
file written but not yet renamed), so the code names a few points and the process sends itself
``SIGKILL`` when the environment variable :data:`ENV` names one of them:

``registration``
    the atlas registration has run, its transforms lie in a temporary folder of the
    registration cache, not yet published as a cache entry.
``inference``
    the image is prepared (the registration published in the cache), sampling has not started.
``write:<file name>``
    an output file (any :mod:`bids_cadiff.io.atomic` write; ``<file name>`` is the final name,
    without folders, e.g. ``write:sub-01_desc-cadiff_dseg.nii.gz``) is complete in its
    temporary file and fsynced, not yet renamed to its final name.

Unset (always, outside the tests), a point costs one dictionary look-up. ``SIGKILL`` cannot be
caught: no ``finally`` block, ``atexit`` handler or context manager runs, exactly as when a
job is killed.
"""

from __future__ import annotations

import os
import signal

#: The environment variable naming the point to die at.
ENV = "CADIFF_TEST_KILL_AT"


def kill_point(name: str) -> None:
    """SIGKILL this process when ``$CADIFF_TEST_KILL_AT`` equals ``name``; else nothing."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
