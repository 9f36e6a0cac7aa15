"""Test-session settings.

TRITON_INTERPRET=1: the Triton kernel of the fused loss (engine/triton_loss.py) runs through Triton's CPU
interpreter here. NOTE: Triton reads it when `triton.language` is first imported (importing torch._dynamo does that),
so it is set in this file, before any test module is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
