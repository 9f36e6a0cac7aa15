"""Test-session settings.

TRITON_INTERPRET=1: the Triton kernel of the fused loss (engine/triton_loss.py) runs through Triton's CPU
interpreter here. NOTE: Triton reads it when `triton.language` is first imported (importing torch._dynamo does that),
so it is set in this file, before any test module is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402 - after the environment above


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny DANet of the synthetic preset saved in our format (a test module may define its own)."""
    from test_faults_common import saved_tiny_checkpoint

    return saved_tiny_checkpoint(tmp_path_factory.mktemp("ck"))
