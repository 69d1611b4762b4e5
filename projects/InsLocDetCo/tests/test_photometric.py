"""The batched photometric augmentation: torchvision's per-image ops, MoCo v2's distributions.

Tolerances: float ops agree with torchvision's float kernels to 1e-5 (hue: 1e-4, an HSV round
trip); RandAugment, on uint8 like torchvision's, agrees exactly.
"""

import math

import pytest
import torch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from insloc_testing import run_distributed
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from insloc_detco.data import photometric as P
from insloc_detco.data.augmentation import PhotometricAugmentation, blur_kernel_size
from insloc_detco.data.randaugment import BatchRandAugment

TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def images(n=5, size=(3, 20, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n,) + size, generator=g)


@pytest.mark.parametrize("index", range(4))
def test_each_jitter_op_equals_torchvision_per_image(index):
    x = images()
    if index == 3:
        factors = torch.tensor([-0.5, -0.1, 0.0, 0.07, 0.49])
    else:
        factors = torch.tensor([0.0, 0.6, 1.0, 1.3, 2.0])
    ours = (P.adjust_brightness, P.adjust_contrast, P.adjust_saturation, P.adjust_hue)[index]
    out = ours(x, factors)
    expected = torch.stack([TV_JITTER[index](img, float(f)) for img, f in zip(x, factors)])
    torch.testing.assert_close(out, expected, atol=1e-4 if index == 3 else 1e-5, rtol=0)


def test_hue_of_grays_and_saturated_colours():
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.3], [0.9, 0.9, 0.2]])
    x = x[:, :, None, None].expand(-1, -1, 2, 2).contiguous()
    shift = torch.tensor([1 / 3, 1 / 3, 0.25, -0.5])
    expected = torch.stack([TF.adjust_hue(img, float(s)) for img, s in zip(x, shift)])
    torch.testing.assert_close(P.adjust_hue(x, shift), expected, atol=1e-5, rtol=0)
    assert torch.allclose(P.adjust_hue(x, shift)[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]))


def test_grayscale_equals_torchvision():
    x = images()
    expected = torch.stack([TF.rgb_to_grayscale(img, num_output_channels=1) for img in x])
    torch.testing.assert_close(P.to_grayscale(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 7, 23])
def test_separable_blur_equals_torchvision_2d_blur(kernel_size):
    x = images(size=(3, 30, 26))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    out = P.gaussian_blur(x, kernel_size, sigma)
    expected = torch.stack(
        [TF.gaussian_blur(img, [kernel_size] * 2, [float(s)] * 2) for img, s in zip(x, sigma)]
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_kernel_size_rule():
    # the odd size nearest to 10% of the view (an even rounding goes up)
    assert blur_kernel_size(224, 0.1) == 23 and blur_kernel_size(256, 0.1) == 27
    assert blur_kernel_size(255, 0.1) == 27 and blur_kernel_size(64, 0.1) == 7
    assert PhotometricAugmentation().kernel_size(224) == 23


def test_flip_with_boxes_equals_torchvision():
    box = torch.tensor([[2.0, 3.0, 10.0, 15.0]])
    expected = TF.horizontal_flip(
        tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=(20, 24))
    ).as_subclass(torch.Tensor)
    torch.testing.assert_close(P.hflip_boxes(box, 24), expected)


def _torchvision_pipeline(img, params, i, kernel_size):
    """MoCo v2's augmentation of sample ``i`` with its drawn parameters, op by op."""
    if params["jitter"][i]:
        for op in params["order"][i].tolist():
            img = TV_JITTER[op](img, float(params["factors"][i, op]))
    if params["gray"][i]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if params["blur"][i]:
        sigma = float(params["sigma"][i])
        img = TF.gaussian_blur(img, [kernel_size] * 2, [sigma, sigma])
    if params["flip"][i]:
        img = TF.horizontal_flip(img)
    return img


def test_pipeline_with_fixed_parameters_equals_torchvision_per_image():
    aug = PhotometricAugmentation()
    x = images(n=64, size=(3, 16, 18)) * 255
    params = aug.sample(64, torch.Generator().manual_seed(3))
    assert params["jitter"].any() and params["blur"].any() and params["gray"].any()
    out, _ = aug.apply(x, params)
    k = aug.kernel_size(18)
    expected = torch.stack(
        [_torchvision_pipeline(img / 255, params, i, k) for i, img in enumerate(x)]
    )
    torch.testing.assert_close(out / 255, expected, atol=2e-4, rtol=0)


def test_parameter_distributions_match_moco_v2():
    aug = PhotometricAugmentation()  # MoCo v2's defaults
    n = 40000
    p = aug.sample(n, torch.Generator().manual_seed(0))
    tol = 4 * math.sqrt(0.25 / n)  # 4 standard errors of a proportion
    assert abs(p["jitter"].float().mean() - 0.8) < tol
    assert abs(p["gray"].float().mean() - 0.2) < tol
    assert abs(p["blur"].float().mean() - 0.5) < tol
    assert abs(p["flip"].float().mean() - 0.5) < tol
    # sigma ~ U[0.1, 2.0]; factors ~ U[0.6, 1.4]; hue ~ U[-0.1, 0.1]
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
    assert abs(p["sigma"].mean() - 1.05) < 0.01 and abs(p["sigma"].var() - 1.9**2 / 12) < 0.01
    assert p["factors"][:, :3].min() >= 0.6 and p["factors"][:, :3].max() <= 1.4
    assert p["factors"][:, 3].min() >= -0.1 and p["factors"][:, 3].max() <= 0.1
    assert torch.allclose(p["factors"].mean(0), torch.tensor([1.0, 1.0, 1.0, 0.0]), atol=0.01)
    # every one of the 24 orders of the four ops, equally often
    orders, counts = torch.unique(p["order"], dim=0, return_counts=True)
    assert len(orders) == 24
    assert (counts.float() / n - 1 / 24).abs().max() < 4 * math.sqrt(1 / 24 / n)


def test_parameters_are_per_sample_and_seeded():
    aug = PhotometricAugmentation()
    torch.manual_seed(7)
    a = aug.sample(16)
    torch.manual_seed(7)
    b = aug.sample(16)
    c = aug.sample(16)
    assert all(torch.equal(a[k], b[k]) for k in a)  # reproducible from the global seed
    assert not torch.equal(a["factors"], c["factors"])
    assert len(set(a["sigma"].tolist())) == 16  # one draw per sample, not per batch
    x = images(n=16) * 255
    torch.manual_seed(7)
    out1, _ = aug(x)
    torch.manual_seed(7)
    out2, _ = aug(x)
    assert torch.equal(out1, out2)


def test_loader_and_device_placements_compute_the_same():
    aug = PhotometricAugmentation()
    views = (images(n=6, size=(3, 32, 32)) * 255).round().to(torch.uint8)
    boxes = torch.tensor([[1.0, 2.0, 20.0, 30.0]]).expand(6, 4)
    torch.manual_seed(1)
    batch, batch_boxes = aug(views, boxes)  # the device path: one call for the batch
    torch.manual_seed(1)
    params = aug.sample(6)
    for i in range(6):  # the loader path: the same module, one view at a time
        one = {k: v[i : i + 1] for k, v in params.items()}
        out, box = aug.apply(views[i : i + 1], one, boxes[i : i + 1])
        torch.testing.assert_close(out, batch[i : i + 1], atol=1e-4, rtol=0)
        assert torch.equal(box, batch_boxes[i : i + 1])
    assert torch.equal(batch_boxes[params["flip"]], P.hflip_boxes(boxes[params["flip"]], 32))
    assert torch.equal(batch_boxes[~params["flip"]], boxes[~params["flip"]])
    view, box = aug.augment_one(views[0], boxes[0])
    assert view.dtype == torch.uint8 and view.shape == (3, 32, 32) and box.shape == (4,)


def _torchvision_draws(seed, num_ops, ops):
    """The ops and signs v2.RandAugment draws after torch.manual_seed(seed), replayed."""
    tv = v2.RandAugment(num_ops=num_ops)
    torch.manual_seed(seed)
    draws = []
    for _ in range(num_ops):
        name = ops[int(torch.randint(len(ops), ()))]
        magnitudes_fn, signed = tv._AUGMENTATION_SPACE[name]
        negate = False
        if magnitudes_fn(tv.num_magnitude_bins, 8, 8) is not None and signed:
            negate = bool(torch.rand(()) <= 0.5)
        draws.append((ops.index(name), negate))
    return draws


def test_batched_randaugment_equals_torchvision_per_image():
    ra = BatchRandAugment(num_ops=2, magnitude=9)
    assert len(ra.ops) == 14 and "Equalize" in ra.ops and "Rotate" in ra.ops
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 24, 28), dtype=torch.uint8, generator=g)
    expected, draws = [], []
    for i in range(len(x)):
        torch.manual_seed(100 + i)
        expected.append(v2.RandAugment(num_ops=2)(x[i]))
        draws.append(_torchvision_draws(100 + i, 2, ra.ops))
    params = {
        "op": torch.tensor([[op for op, _ in d] for d in draws]),
        "negate": torch.tensor([[neg for _, neg in d] for d in draws]),
    }
    assert len(params["op"].unique()) > 8  # the batch mixes many ops
    out = ra.apply(x, params)
    assert out.dtype == torch.uint8
    assert torch.equal(out, torch.stack(expected))


def _draws_per_rank(seed):
    seed_all_rng(seed + comm.get_rank())  # what detectron2's default_setup does
    params = PhotometricAugmentation().sample(8)
    gathered = comm.all_gather(params["sigma"])
    assert not torch.equal(gathered[0], gathered[1]), "two ranks share a random stream"


@pytest.mark.slow
def test_ranks_draw_different_parameters():
    run_distributed(_draws_per_rank, 2, args=(3,))
