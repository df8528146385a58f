"""Strategies: which blocks a model has, checkpointing them (modules and Sequential segments), the KV cache."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit import Config, estimate
from memfit.strategies import Checkpointing, blocks, segment_layers
from zoo import ZOO


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn(self.conv1(x)))))


class ResNetStages(nn.Module):
    """torchvision's layout: a stem, stages that are nn.Sequentials of residual blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1 = nn.Sequential(Residual(16), Residual(16))
        self.layer2 = nn.Sequential(Residual(16), Residual(16), Residual(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


class VGGFeatures(nn.Module):
    """torchvision's VGG layout: ``features``, an nn.Sequential of plain layers, in-place ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 8 * 8, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def _image_workload(model) -> memfit.Workload:
    return memfit.Workload(model=model, batch=lambda n: (torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))),
                           loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))


def test_blocks_are_found_in_module_lists_and_in_sequential_stages():
    assert blocks(ZOO["tied-lm"]().model()) == ["blocks.0", "blocks.1", "blocks.2"]
    assert blocks(ResNetStages()) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer2.2"]
    # A Sequential of plain layers: segments from each layer with parameters to the next.
    assert blocks(VGGFeatures()) == ["features[0:2]", "features[2:5]", "features[5:8]", "classifier[0:3]"]
    assert segment_layers("features[2:5]") == ["features.2", "features.3", "features.4"]
    assert segment_layers("features.2") is None
    assert blocks(memfit.presets.load("cifar-cnn").model()) == []
    assert blocks(memfit.presets.load("gpt2-tiny").model()) == ["transformer.h.0", "transformer.h.1"]


@pytest.mark.parametrize("make", [ResNetStages, VGGFeatures], ids=["resnet-stages", "vgg-features"])
def test_checkpointing_every_block_lowers_the_peak_and_trains_the_same(make):
    workload = _image_workload(make)
    plain = estimate(workload, Config(micro_batch=16), device="cpu")
    ckpt = estimate(workload, Config(micro_batch=16, checkpoint="all"), device="cpu")
    assert ckpt.peak < plain.peak and ckpt.checkpointed == tuple(blocks(make()))
    assert ckpt.report.peak_by_category["activations"] < plain.report.peak_by_category["activations"]

    torch.manual_seed(0)
    reference = make()
    model = copy.deepcopy(reference)
    batches = [workload.batch(8) for _ in range(2)]
    for m, config in ((reference, Config(micro_batch=4)), (model, Config(micro_batch=4, checkpoint="all"))):
        trainer = memfit.Trainer.from_parts(m, workload.optimizer(m.parameters()), workload.loss, config)
        torch.manual_seed(1)  # the same dropout masks
        for b in batches:
            trainer.step(b)
    assert list(model.state_dict()) == list(reference.state_dict())
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_segments_and_modules_inside_them_are_checkpointed_once():
    model = VGGFeatures()
    chosen = Checkpointing(("features[2:5]", "features.3", "classifier", "classifier[0:2]")).select(model)
    assert chosen == ["features[2:5]", "classifier"]
    paths = Checkpointing(("features[0:2]", "features[5:8]")).apply(model)
    assert paths == ["features[0:2]", "features[5:8]"] and "forward" in model.features.__dict__
    Checkpointing.remove(model, paths)
    assert "forward" not in model.features.__dict__


def test_plan_takes_checkpoint_candidates_and_a_single_precision_name():
    workload = _image_workload(ResNetStages)
    plain = estimate(workload, Config(micro_batch=16), device="cpu", accumulation=1).required
    budget = estimate(workload, Config(micro_batch=16, checkpoint=("layer1.*",)), device="cpu").required
    assert budget < plain
    chosen = memfit.plan(workload, budget, 16, device="cpu", precisions="32-true", checkpoint_candidates=("layer1.*",))
    assert set(chosen.config.checkpoint) <= {"layer1.0", "layer1.1"} and chosen.required <= budget
    with pytest.raises(memfit.UsageError, match="checkpoint glob 'layer9.\\*' matches no module"):
        memfit.plan(workload, budget, 16, device="cpu", checkpoint_candidates="layer9.*")
    with pytest.raises(memfit.UsageError, match="m_half must be a positive number"):
        memfit.plan(workload, budget, 16, device="cpu", m_half=0)
