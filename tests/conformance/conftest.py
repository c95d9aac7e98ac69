"""Conformance suite: models and weights made by the real frameworks at test time.

Each framework is optional (``pip install -e '.[frameworks]'``, which scripts/setup.sh does);
a case whose framework is missing is skipped with the reason and the install line. JAX runs on
the CPU and Keras on the torch backend, set before either is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny configs are built locally; nothing is downloaded
# XLA's CPU compiler dominates a tiny Flax model's run time; its cheap settings halve it (the
# reference is still what apply() computes)
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()

INSTALL = "pip install -e '.[frameworks]' (scripts/setup.sh installs it)"


def need(module: str):
    """Import ``module`` or skip the test, saying which framework is missing and how to get it."""
    # ImportError too: a half-installed framework (e.g. a jaxlib that does not match jax) skips, saying so
    return pytest.importorskip(module, reason=f"{module} is not installed or does not import: {INSTALL}", exc_type=ImportError)


def need_timm():
    """timm, imported from ``.venv/timm-oracle`` (scripts/setup.sh), with a torchvision that imports.

    PyPI's torchvision 0.28 (the release built for torch 2.13) is a CUDA build: its compiled ops
    do not load beside the CPU torch, and its import then fails registering fake kernels for two
    ops it never defined. So it lives outside site-packages (where its failing import would
    break transformers), and here the two op schemas are declared before it is imported; timm's
    models (and its ``_load_weights``, the oracle for JAX ViT files) use none of torchvision's ops.
    """
    import sys

    import torch

    oracle = Path(sys.prefix) / "timm-oracle"
    if oracle.is_dir() and str(oracle) not in sys.path:
        sys.path.append(str(oracle))
    if not hasattr(need_timm, "_lib"):
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            try:
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:  # torchvision's own ops did load: nothing to declare
                pass
        need_timm._lib = lib  # keep the registration alive
    return pytest.importorskip("timm", reason=f"timm is not installed in {oracle}: bash scripts/setup.sh installs it")


@pytest.fixture
def timm():
    return need_timm()


@pytest.fixture
def transformers():
    return need("transformers")


@pytest.fixture
def flax_linen():
    need("jax")
    return need("flax.linen")


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    """Every case here is a conformance case (``-m "not conformance"`` leaves them out)."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.conformance)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    """The table the issue asks for: max abs error of each case against its source-side reference."""
    from .conformance_support import EXPORT_RESULTS, RESULTS

    if not RESULTS and not EXPORT_RESULTS:
        return
    terminalreporter.section("conformance: max abs error vs the source framework's reference")
    for case, (np2torch_err, fresh_err, n_unverified) in sorted(RESULTS.items()):
        terminalreporter.write_line(f"{case:<34} verify {np2torch_err:.3g}   fresh strict load {fresh_err:.3g}   "
                                    f"unverified without reference: {n_unverified}")
    for case, err in sorted(EXPORT_RESULTS.items()):
        terminalreporter.write_line(f"{case:<34} export loaded strictly into the torch port {err:.3g}")
