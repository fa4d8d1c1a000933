"""The seed's ColorJitter, batched: torchvision's math, torchvision's ranges, seeded by the step."""
import itertools

import torch
from torchvision.transforms.v2 import functional as F

from iqa_dist.data.jitter import color_jitter, draw, jittered
from iqa_dist.data.stream import to_model_input

TORCHVISION = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def _patches(n: int) -> torch.Tensor:
    """uint8 NHWC patches with the cases that branch: gray pixels, black, white, pure hues."""
    x = torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x[0] = 128
    x[1, :4] = 0
    x[1, 4:8] = 255
    x[2, :, :, 0] = 255  # red, then the other hues' maxima
    x[3, :, :, 1] = 255
    x[4, :, :, 2] = 255
    return x


def test_batched_jitter_equals_torchvision_per_image():
    x = _patches(48).permute(0, 3, 1, 2).float() / 255
    params = draw(len(x), seed=3, epoch=1, rank=0, step=5)
    out = color_jitter(x, params)
    for i in range(len(x)):
        expected = x[i]
        for op in params.order[i].tolist():  # torchvision's ColorJitter applies them in a drawn order
            expected = TORCHVISION[op](expected, float(params.factors[i, op]))
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)


def test_jittered_model_input_is_the_jittered_image_normalised():
    raw = _patches(8)
    params = draw(len(raw), seed=0, epoch=0, rank=0, step=0)
    x01 = color_jitter(raw.permute(0, 3, 1, 2).float() / 255, params)
    torch.testing.assert_close(jittered(to_model_input(raw, "cpu"), params),
                               to_model_input(x01.permute(0, 2, 3, 1) * 255, "cpu"), rtol=0, atol=1e-5)


def test_parameters_in_the_seeds_ranges_and_a_function_of_seed_epoch_rank_step():
    p = draw(2000, seed=1, epoch=2, rank=3, step=4)
    f = p.factors
    assert f.shape == (2000, 4) and f.dtype == torch.float32
    assert ((f[:, :3] >= 0.9) & (f[:, :3] <= 1.1)).all() and (f[:, 3].abs() <= 0.05).all()
    assert f[:, :3].min() < 0.91 and f[:, :3].max() > 1.09 and f[:, 3].abs().max() > 0.049  # the whole range
    assert (p.order.sort(dim=1).values == torch.arange(4)).all()  # each row a permutation
    assert {tuple(r) for r in p.order.tolist()} == set(itertools.permutations(range(4)))
    again = draw(2000, seed=1, epoch=2, rank=3, step=4)
    assert torch.equal(f, again.factors) and torch.equal(p.order, again.order)
    for other in ((0, 2, 3, 4), (1, 1, 3, 4), (1, 2, 0, 4), (1, 2, 3, 5)):
        assert not torch.equal(draw(2000, *other).factors, f)
