"""The bundled digits model and samples: shapes, accuracy, and loading without scikit-learn."""

import subprocess
import sys

import torch

from boundprop.data import ARCHITECTURES, BUNDLE_PATH, bundle_info, load_digits_model, load_digits_samples


def test_bundle_is_small_and_shapes():
    assert BUNDLE_PATH.stat().st_size < 1_000_000
    info = bundle_info()
    assert info["arch"] in ARCHITECTURES and info["num_samples"] >= 100
    assert info["test_accuracy"] > 0.95
    x, y = load_digits_samples(7)
    assert x.shape == (7, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (7,) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(load_digits_samples()[1].tolist()) == set(range(10))


def test_bundled_model_accuracy_on_bundled_samples():
    model = load_digits_model()
    assert not model.training
    x, y = load_digits_samples()
    with torch.no_grad():
        accuracy = float((model(x).argmax(-1) == y).float().mean())
    assert accuracy > 0.9


def test_fresh_copies():
    a, b = load_digits_model(), load_digits_model()
    next(a.parameters()).data.zero_()
    assert float(next(b.parameters()).abs().sum()) > 0
    x1, _ = load_digits_samples(2)
    x1.zero_()
    assert float(load_digits_samples(2)[0].sum()) > 0


def test_loading_does_not_need_sklearn():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'sklearn' or name.startswith('sklearn.'):\n"
        "            raise ImportError('scikit-learn is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from boundprop.data import load_digits_model, load_digits_samples\n"
        "m = load_digits_model(); x, y = load_digits_samples(3)\n"
        "print(m(x).argmax(-1).shape, 'sklearn' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["torch.Size([3])", "False"]
