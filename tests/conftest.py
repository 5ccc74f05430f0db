"Fixtures shared by the test modules."
import os
import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    "Tiny models train as fast on one thread, and several threads stall on a busy machine; restored afterwards."
    old, n = os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads()
    os.environ['OMP_NUM_THREADS'] = '1'; torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if old is None: os.environ.pop('OMP_NUM_THREADS', None)
    else: os.environ['OMP_NUM_THREADS'] = old
