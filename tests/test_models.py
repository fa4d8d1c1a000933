"""HyperIQA: shapes, parameter counts against the reference, target network, weights loading."""
from __future__ import annotations

import copy
import gc

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from iqa_dist.losses import iqa_loss
from iqa_dist.models import MODEL_SIZES, HyperIQA, create_model
from iqa_dist.models.backbones import BACKBONES, Backbone
from iqa_dist.models.hyperiqa import TARGET_WIDTHS, HyperNetwork, TargetNetwork

FUSION_MODES = {"concat": dict(multiscale=True), "attention": dict(multiscale=True, attention_fusion=True),
                "single": dict(multiscale=False)}
# millions of parameters, from the reference (hyperiqa.md); the original HyperIQA is single scale
REFERENCE_PARAMS = {
    "tiny": {"concat": 29.32, "attention": 29.52, "single": 28.98},
    "small": {"concat": 50.64, "attention": 50.84, "single": 50.30},
    "base": {"concat": 88.85, "attention": 89.11, "single": 88.39},
    "resnet50": {"single": 27.4},
}
CHANNELS = {"micro": (32, 64, 128, 256), "tiny": (96, 192, 384, 768), "small": (96, 192, 384, 768),
            "base": (128, 256, 512, 1024), "resnet50": (256, 512, 1024, 2048),
            "mobilenet": (16, 24, 48, 576)}
STRIDES = (4, 8, 16, 32)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_sizes_table_is_complete() -> None:
    assert set(MODEL_SIZES) == set(CHANNELS)


@pytest.mark.parametrize("size", ["micro", "tiny", "resnet50", "mobilenet"])
def test_backbone_maps_are_nchw(size: str) -> None:
    model = create_model(size).eval()
    with torch.no_grad():
        feats = model.forward_backbone(torch.randn(1, 3, 224, 224))
        score = model(torch.randn(1, 3, 224, 224))
    assert model.backbone.channels == CHANNELS[size]
    assert [tuple(f.shape) for f in feats] == [(1, c, 224 // s, 224 // s) for c, s in zip(CHANNELS[size], STRIDES)]
    assert score.shape == (1,)


def test_resnet50_fetches_torchvisions_weights() -> None:
    cfg = Backbone("resnet50").body.pretrained_cfg  # what pretrained=True would download
    assert (cfg["tag"], cfg["origin_url"]) == ("tv_in1k", "https://github.com/pytorch/vision")


def test_swin_maps_are_timm_maps_permuted() -> None:
    backbone = Backbone("micro").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours, raw = backbone(x), backbone.body(x)
    assert all(torch.equal(o, r.permute(0, 3, 1, 2)) for o, r in zip(ours, raw))


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_forward_shape_per_fusion_mode(mode: str) -> None:
    model = create_model("micro", **FUSION_MODES[mode]).eval()
    for batch in (1, 3):  # a batch of one keeps its batch dimension
        with torch.no_grad():
            scores = model(torch.randn(batch, 3, 224, 224))
        assert scores.shape == (batch,)
        assert torch.isfinite(scores).all()
    expected_in = CHANNELS["micro"][3] if mode == "single" else sum(CHANNELS["micro"])
    assert model.hyper.trunk[0].in_channels == expected_in
    assert (model.fusion.attention is not None) == (mode == "attention")


@pytest.mark.parametrize("size", REFERENCE_PARAMS)
def test_parameter_counts_match_reference(size: str) -> None:
    backbone = Backbone(size)  # built once, shared by the three heads
    assert backbone.channels == CHANNELS[size]
    for mode, millions in REFERENCE_PARAMS[size].items():
        measured = n_params(HyperIQA(backbone, **FUSION_MODES[mode])) / 1e6
        assert measured == pytest.approx(millions, rel=0.005), f"{size}/{mode}: {measured:.3f}M"
    del backbone
    gc.collect()


def test_hyper_network_generates_reference_shapes() -> None:
    hyper = HyperNetwork(480, (512, 256), dropout_rate=0.0)
    params = hyper(torch.randn(2, 480, 7, 7))
    expected = [((2, n_out, n_in), (2, n_out)) for n_in, n_out in zip(TARGET_WIDTHS, TARGET_WIDTHS[1:])]
    assert [(tuple(w.shape), tuple(b.shape)) for w, b in params] == expected
    generated = sum(w[0].numel() + b[0].numel() for w, b in params)
    assert generated == 33_545  # per-patch target network size in the reference


def init_groups(model: HyperIQA) -> dict[str, list[nn.Module]]:
    def layers(*parts: nn.Module) -> list[nn.Module]:
        return [m for part in parts for m in part.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    hyper = model.hyper
    return {"kaiming": layers(model.lda, hyper.weight_convs, hyper.last_weight, hyper.bias_fcs),
            "default": layers(hyper.trunk, model.fusion.attention)}


def test_head_starts_as_the_original_kaiming_on_taps_and_heads_default_on_trunk_and_attention() -> None:
    model = create_model("micro", attention_fusion=True)
    groups = init_groups(model)
    assert [len(g) for g in groups.values()] == [7 + 4 + 1 + 5, 3 + 2]  # LDA, weight convs, last, bias fcs
    for name, group in groups.items():
        for layer in group:
            w = layer.weight.detach().double()
            fan_in, n = w[0].numel(), w.numel()
            # kaiming_normal_: sqrt(2 / fan_in); PyTorch's default U(+-1/sqrt(fan_in)): 1 / sqrt(3 fan_in),
            # 2.4x smaller. The sample std of n draws is off by about sqrt(1/(2n)) relative at most
            # (normal; uniform sqrt(1/(5n))): six of those is a tolerance no seed can cross.
            expected = (2 / fan_in) ** 0.5 if name == "kaiming" else (3 * fan_in) ** -0.5
            assert w.std().item() == pytest.approx(expected, rel=6 * (2 * n) ** -0.5), (name, layer)


def test_batched_target_network_equals_per_sample_loop() -> None:
    hyper, target = HyperNetwork(480, (512, 256), 0.3).eval(), TargetNetwork(0.3).eval()
    x = torch.randn(5, TARGET_WIDTHS[0])
    params = hyper(torch.randn(5, 480, 7, 7))
    with torch.no_grad():
        batched = target(x, params)
    for b in range(len(x)):
        h = x[b]
        for k, (w, bias) in enumerate(params):
            h = w[b] @ h + bias[b]
            h = torch.sigmoid(h) if k < len(params) - 1 else h
        assert batched[b].item() == pytest.approx(h.item(), abs=1e-5)


@pytest.mark.parametrize("bf16", ["autocast", "weights"])
def test_under_bf16_heads_and_target_network_compute_in_fp32(bf16: str) -> None:
    """The backbone, taps and trunk run in bf16 (autocast, or a model cast to bf16 as
    DeepSpeed does); from the same inputs (the LDA vector, the trunk's maps) upcast, the
    generated parameters and the scores are what fp32 gives."""
    model = create_model("micro").eval()
    x = torch.randn(3, 3, 224, 224)
    if bf16 == "weights":
        model, x = model.bfloat16(), x.bfloat16()
    seen: dict[str, object] = {}
    for name, part in (("lda", model.lda), ("trunk", model.hyper.trunk), ("params", model.hyper)):
        part.register_forward_hook(lambda module, args, out, name=name: seen.__setitem__(name, out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 == "autocast"):
        scores = model(x)
    assert seen["lda"].dtype == seen["trunk"].dtype == torch.bfloat16  # bf16 upstream

    hyper, h = copy.deepcopy(model.hyper).float(), seen["trunk"].float()
    with torch.no_grad():
        pooled = h.mean(dim=(2, 3))
        weights = [conv(h) for conv in hyper.weight_convs] + [hyper.last_weight(pooled)]
        biases = [fc(pooled) for fc in hyper.bias_fcs]
    params = seen["params"]
    for (w, b), w32, b32 in zip(params, weights, biases):
        assert w.dtype == b.dtype == torch.float32
        torch.testing.assert_close(w.flatten(1), w32.flatten(1), rtol=1e-5, atol=1e-5 * w32.abs().max().item())
        torch.testing.assert_close(b, b32, rtol=1e-5, atol=1e-5 * b32.abs().max().item())

    x = seen["lda"].double()  # the target network by hand, one matrix product per layer
    for k, (w, b) in enumerate(params):
        x = (w.double() @ x[..., None])[..., 0] + b.double()
        x = torch.sigmoid(x) if k < len(params) - 1 else x[:, 0]
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), x, rtol=1e-5, atol=1e-5 * x.abs().max().item())


def test_forward_backward_reaches_backbone_and_hyper_network() -> None:
    model = create_model("micro", attention_fusion=True).train()
    scores = model(torch.randn(4, 3, 224, 224))
    iqa_loss(scores, torch.tensor([10.0, 40.0, 70.0, 90.0])).backward()
    parts = {"backbone": model.backbone.body.patch_embed.proj.weight, "lda": model.lda.taps[0][0].weight,
             "hyper trunk": model.hyper.trunk[0].weight, "weight conv": model.hyper.weight_convs[0].weight,
             "attention": model.fusion.attention.net[0].weight}
    for name, p in parts.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_dropout_and_drop_path_reach_their_modules() -> None:
    model = create_model("micro", dropout_rate=0.37, drop_path_rate=0.25)
    assert model.hyper.dropout.p == model.target.dropout.p == 0.37
    drop_probs = [m.drop_prob for m in model.backbone.modules() if isinstance(m, timm.layers.DropPath)]
    assert drop_probs and max(drop_probs) == pytest.approx(0.25)


def test_regularisation_is_what_makes_training_forward_random() -> None:
    x = torch.randn(1, 3, 224, 224)
    plain = create_model("micro", dropout_rate=0.0, drop_path_rate=0.0).train()
    noisy = create_model("micro", dropout_rate=0.5, drop_path_rate=0.0).train()
    assert torch.equal(plain(x), plain(x))
    assert not torch.equal(noisy(x), noisy(x))
    noisy.eval()
    assert torch.equal(noisy(x), noisy(x))


@pytest.mark.parametrize("shape", [(1, 3, 192, 192), (1, 3, 224, 256), (3, 224, 224), (1, 1, 224, 224)])
def test_input_must_be_224_rgb_patches(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="224"):
        create_model("micro")(torch.randn(*shape))


def test_unknown_size_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="huge") as err:
        create_model("huge")
    assert all(size in str(err.value) for size in MODEL_SIZES)


def test_attention_fusion_needs_multiscale() -> None:
    with pytest.raises(ValueError, match="multiscale"):
        create_model("micro", multiscale=False, attention_fusion=True)


def _timm_micro(**overrides) -> nn.Module:
    spec = BACKBONES["micro"]
    return timm.create_model(spec.timm_name, **{**spec.timm_kwargs, **overrides})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_are_loaded(tmp_path, suffix: str) -> None:
    source = _timm_micro()
    path = tmp_path / f"micro{suffix}"
    (torch.save if suffix == ".pth" else save_file)(source.state_dict(), str(path))
    body = create_model("micro", pretrained_path=path).backbone.body
    assert torch.equal(body.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert torch.equal(body.layers_3.blocks[0].mlp.fc2.weight, source.layers[3].blocks[0].mlp.fc2.weight)


def test_weights_of_another_size_give_one_line_error(tmp_path) -> None:
    path = tmp_path / "wider.pth"
    torch.save(_timm_micro(embed_dim=48).state_dict(), path)
    with pytest.raises(ValueError, match="size mismatch") as err:
        create_model("micro", pretrained_path=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_weights_file_is_named(tmp_path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        create_model("micro", pretrained_path=path)


def test_hyper_network_pooling_avoids_adaptive_pooling_at_224(monkeypatch):
    """Adaptive average pooling has no deterministic CUDA backward (``deterministic: true``
    refuses it): the stage maps of a 224 patch (56, 28, 14, 7) are pooled by a plain
    average pool, which gives the same numbers."""
    from torch.nn import functional as F

    from iqa_dist.models.hyperiqa import POOL, pooled

    maps = [torch.randn(2, 3, side, side) for side in (56, 28, 14, 7)]
    expected = [F.adaptive_avg_pool2d(f, POOL) for f in maps]
    monkeypatch.setattr(F, "adaptive_avg_pool2d", None)  # calling it would fail
    for f, want in zip(maps, expected):
        assert torch.allclose(pooled(f), want, atol=1e-6)
    model = create_model("micro", dropout_rate=0.0, drop_path_rate=0.0)
    model(torch.randn(1, 3, 224, 224)).sum().backward()
