import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    import locedit

    return locedit.load("smollm2-135m")


@pytest.fixture(scope="session")
def eiffel():
    import locedit

    return locedit.Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of", " Paris")
