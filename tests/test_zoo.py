"""The torchvision zoo through autoprune (#13): supported models prune exactly, the rest are refused.

CI checks the smallest model of every family (the whole suite must stay under 20 minutes);
``AUTOPRUNE_ZOO=all`` checks all of ``torchvision.models.list_models(module=torchvision.models)``,
as ``benchmarks/zoo.py`` does for the README's table.
"""

import fnmatch
import os
import re
import sys

import pytest
import torch
from conftest import REPO

torchvision = pytest.importorskip("torchvision")
sys.path.insert(0, str(REPO / "benchmarks"))

from zoo import check_model  # noqa: E402

from autoprune.pruning import _trace  # noqa: E402

#: The one place that says what autoprune cannot prune yet, and why; each must be refused cleanly.
UNSUPPORTED = {
    # Its index mappings through the window partition grow without bound (Swin-T, V2) or fail
    # outright (Swin-S, Swin-B: a shape it cannot infer).
    "swin_*": "did not finish|cannot trace the channel dependencies",
    # The same growth through MaxViT's block and grid partitions.
    "maxvit_*": "did not finish",
}

FAMILY_SMALLEST = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
    "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
    "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t",
    "vgg11_bn", "vit_b_32", "wide_resnet50_2",
]
ALL = torchvision.models.list_models(module=torchvision.models)
MODELS = ALL if os.environ.get("AUTOPRUNE_ZOO") == "all" else [m for m in FAMILY_SMALLEST if m in ALL]


def _expected_refusal(name: str) -> str | None:
    return next((why for pattern, why in UNSUPPORTED.items() if fnmatch.fnmatchcase(name, pattern)), None)


def test_every_family_of_the_zoo_is_covered():
    families = {name.split("_")[0].rstrip("0123456789") for name in ALL}
    covered = {name.split("_")[0].rstrip("0123456789") for name in FAMILY_SMALLEST}
    assert families <= covered, f"families without a CI representative: {sorted(families - covered)}"


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_prunes_exactly_or_is_refused_cleanly(name, monkeypatch):
    # Swin's and MaxViT's refusals come from a limit on Torch-Pruning's dependency analysis; a lower
    # one here keeps the test fast (the default is 120 s and 6 GiB). The models that must prune get
    # more time, so that a slow machine does not refuse them.
    seconds = 8.0 if _expected_refusal(name) else 20.0
    monkeypatch.setattr(_trace, "TRACE_LIMITS", (seconds, 1.5 * 2**30))
    threads = torch.get_num_threads()
    try:
        row = check_model(name, threads=threads)
    finally:
        torch.set_num_threads(threads)
    refusal = _expected_refusal(name)
    if refusal is None:
        assert row["status"] == "ok", row
        assert row["macs_error"] <= 0.005 and row["groups"] > 0
        # Exact, not only shaped right: the pruned model computes what the dense one does with the
        # removed channels zeroed (on every group not feeding a LayerNorm, which zeros would shift).
        assert row["exact_groups"] > 0 and row["exact_error"] <= 1e-3, row
    else:
        assert row["status"] == "refused" and re.search(refusal, row["reason"]), row
