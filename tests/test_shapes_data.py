"""The shapes world's procedural data: deterministic by seed, captions agree with ground truth."""
import random

import torch

from doodl_lightning.shapes import data as D


def test_same_seed_same_batch_and_different_seed_differs():
    a1, x1, c1 = D.make_batch(123, 8, caption="diffusion", p_two=0.3)
    a2, x2, c2 = D.make_batch(123, 8, caption="diffusion", p_two=0.3)
    assert torch.equal(x1, x2) and c1 == c2 and torch.equal(a1.shape, a2.shape)
    _, x3, _ = D.make_batch(124, 8)
    assert not torch.equal(x1, x3)
    assert x1.shape == (8, 3, D.IMAGE_SIZE, D.IMAGE_SIZE) and x1.min() >= -1 and x1.max() <= 1


def test_full_captions_name_every_attribute():
    attrs = D.sample_attributes(5, 32)
    for i in range(32):
        gt = attrs.item(i)
        o = gt["objects"][0]
        dcap = D.diffusion_caption(attrs, i, full=True)
        ccap = D.clip_caption(attrs, i, full=True)
        for cap in (dcap, ccap):
            assert o["colour"] in cap and o["size"] in cap and gt["background"] in cap
            pos = "in the center" if o["position"] == "center" else f"at the {o['position']}"
            assert pos in cap
        assert o["shape"] in ccap
        assert o["coarse_shape"] in dcap.split()


def test_diffusion_captions_never_name_the_fine_polygon_class():
    """Vocabulary expansion: triangle/square/pentagon/hexagon are all 'polygon' to the diffusion model."""
    rng = random.Random(0)
    attrs = D.sample_attributes(9, 200, p_two=0.2)
    words = set()
    for i in range(200):
        words |= set(D.diffusion_caption(attrs, i, rng).split())
    assert not words & {"triangle", "square", "pentagon", "hexagon", "blurry", "faint", "sharp"}
    assert "polygon" in words and words <= set(D.VOCABULARY)


def test_shapes_are_drawn_where_the_ground_truth_says():
    """Pixels wholly within the outline's nearest point (ratio * radius from the centre) are the shape's
    colour; pixels wholly beyond its farthest point (the circumradius) are background."""
    attrs = D.sample_attributes(11, 16, p_degraded=0.0)
    assert bool((attrs.n_objects == 1).all())
    x = D.render(attrs)
    bg = attrs.background_rgb * 2 - 1
    centres = torch.arange(D.IMAGE_SIZE, dtype=torch.float32) + 0.5  # pixel (row r, col c) is centred at (c + .5, r + .5)
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    margin = 0.75  # > the farthest sub-sample of a 4x4 super-sampled pixel from its centre (0.375 * sqrt 2)
    sizes = set()
    for i in range(16):
        cx, cy = attrs.center[i, 0]
        rho = ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
        radius = float(attrs.radius[i, 0])
        ratio = D.SHAPE_GEOMETRY[D.SHAPES[attrs.shape[i, 0]]][1]
        inside, outside = rho < ratio * radius - margin, rho > radius + margin
        assert inside.any() and outside.any()
        colour = attrs.colour_rgb[i, 0] * 2 - 1
        assert torch.allclose(x[i][:, inside], colour[:, None].expand(-1, int(inside.sum())), atol=1e-5), i
        assert torch.allclose(x[i][:, outside], bg[i][:, None].expand(-1, int(outside.sum())), atol=1e-5), i
        # the pixel under the centre is the shape's colour, and the farthest corner always background
        assert torch.allclose(x[i, :, int(cy), int(cx)], colour, atol=0.02)
        far = (0 if cy > D.IMAGE_SIZE / 2 else -1, 0 if cx > D.IMAGE_SIZE / 2 else -1)
        assert torch.allclose(x[i, :, far[0], far[1]], bg[i], atol=1e-5)
        sizes.add(D.SIZES[attrs.size[i, 0]])
    assert sizes == set(D.SIZES)  # large shapes too, with no excuse


def test_quality_score_range_and_degradation():
    attrs = D.sample_attributes(3, 512, p_degraded=0.7)
    q = attrs.quality
    assert q.min() >= 0 and q.max() <= 10 + 1e-5
    pristine = (attrs.blur == 0) & (attrs.alpha == 1)
    assert torch.allclose(q[pristine], torch.full_like(q[pristine], 10.0))
    assert (~pristine).float().mean() > 0.5


def test_clip_hard_negatives_change_exactly_one_named_attribute():
    """NegCLIP-style negatives: worded like the positive, one attribute value swapped, never the positive."""
    attrs, _, captions = D.make_batch(21, 64, caption="clip", p_two=0.1)
    rng, neg_rng = random.Random(21), random.Random(0)
    values = {w for names in D.ATTRIBUTE_NAMES.values() for name in names for w in name.split()}
    n_negatives = 0
    for i in range(64):
        state = rng.getstate()
        positive = D.clip_caption(attrs, i, rng)
        assert positive == captions[i]  # replaying the draws reproduces make_batch's caption
        negatives = D.clip_hard_negatives(attrs, i, state, positive, 3, neg_rng)
        assert len(set(negatives)) == len(negatives) <= 3 and positive not in negatives
        for neg in negatives:
            a, b = positive.split(), neg.split()
            # same wording, and what differs are attribute words ("top left" -> "top" changes the length)
            diff = [w for w in set(a) ^ set(b) if w not in {"a", "an", "at", "in", "the", "center"}]
            if diff:
                assert set(diff) <= values | {"polygon"}, (positive, neg)
            else:  # two objects' colours or positions swapped: same words, other order
                content = lambda words: sorted(w for w in words if w not in {"a", "an"})  # noqa: E731
                assert content(a) == content(b) and a != b and " and " in positive, (positive, neg)
        n_negatives += len(negatives)
    assert n_negatives >= 2 * 64  # most captions name enough attributes for 3 negatives
