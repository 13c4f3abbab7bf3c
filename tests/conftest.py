"""Tests run single-threaded: their tensors are tiny, and on a loaded 2-core machine OpenMP threads that
spin-wait for each other make small ops up to 30x slower than one thread."""

import torch

torch.set_num_threads(1)
