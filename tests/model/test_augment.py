"""The device-side augmentation keeps images and their 68 landmarks in register."""

from __future__ import annotations

import torch

from model.augment import FLIP_68, AugmentSettings, random_affines, warp_images, warp_points


def test_flip_permutation_is_an_involution_over_all_68_points() -> None:
    assert sorted(FLIP_68) == list(range(68))
    assert all(FLIP_68[FLIP_68[i]] == i for i in range(68))
    # Outer eye corners and mouth corners swap sides; the nose tip stays.
    assert FLIP_68[36] == 45 and FLIP_68[48] == 54 and FLIP_68[30] == 30


def test_warped_points_follow_the_warped_pixels() -> None:
    generator = torch.Generator().manual_seed(3)
    n, side, size = 16, 48, 112
    theta, flipped = random_affines(n, AugmentSettings(), torch.device("cpu"), generator)
    # One bright pixel per image at a random spot, and its landmark at the pixel's centre.
    xy = torch.randint(12, side - 12, (n, 2), generator=generator)
    images = torch.zeros(n, 1, side, side)
    images[torch.arange(n), 0, xy[:, 1], xy[:, 0]] = 1.0
    points = ((xy.float() + 0.5) / side)[:, None, :].repeat(1, 68, 1)
    warped = warp_images(images, theta, size)
    moved = warp_points(points, theta, torch.zeros(n, dtype=torch.bool))
    peak = warped[:, 0].flatten(1).argmax(dim=1)
    found = torch.stack([peak % size, peak // size], dim=1).float().add(0.5) / size
    # Bilinear spreading moves the brightest output pixel by at most about one source pixel.
    assert (found - moved[:, 0]).abs().max() < 1.5 / side
    assert flipped.any() and (~flipped).any()


def test_flipped_points_are_relabelled_to_their_mirror_landmark() -> None:
    theta = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # a pure horizontal mirror
    points = torch.rand(1, 68, 2)
    moved = warp_points(points, theta, torch.tensor([True]))
    expected = points[:, list(FLIP_68)].clone()
    expected[..., 0] = 1 - expected[..., 0]
    torch.testing.assert_close(moved, expected)
