import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Two cores: keep intra-op threads at what the machine has, and results repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _keep_threads():
    """Training runs set their own thread count (--threads): each test starts with the suite's."""
    from vitkit.fast import set_num_threads

    n = torch.get_num_threads()
    yield
    set_num_threads(n)  # only if it changed: torch's setter also pins MKL's threading (see its docstring)


def write_photo_folder(root: Path, counts: dict[str, int], sizes: tuple[int, int] | None = None) -> Path:
    """Real photos (scikit-image's astronaut, cat and coffee) as a folder dataset ``root/SPLIT/CLASS/i.png``:
    random crops of each, ``counts[split]`` per class; square crops of a half to all of the shorter side,
    or, with ``sizes=(lo, hi)``, crops of lo to hi pixels a side, of any shape."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for name, image in {"astronaut": data.astronaut(), "cat": data.chelsea(), "coffee": data.coffee()}.items():
            (root / split / name).mkdir(parents=True)
            h, w = image.shape[:2]
            for i in range(n):
                if sizes is None:
                    sh = sw = int(rng.integers(min(h, w) // 2, min(h, w)))
                else:
                    sh, sw = (int(rng.integers(*sizes)) for _ in range(2))
                y, x = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
                Image.fromarray(image[y:y + sh, x:x + sw]).save(root / split / name / f"{i}.png")
    return root
