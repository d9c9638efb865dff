"""Test-wide settings.

Tiny random models run many small ops whose intra-op threading costs more than it saves
(and two test processes would fight over 2 cores), so tests use one torch thread.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
