"""Arrow-pointing generator: determinism, balance, geometry of labels, resolution independence."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from plstm_graph.datasets.arrows import ArrowPointing, ArrowScene, make_arrow_dataset, points_at, render


def test_deterministic_and_seed_dependent():
    a, la = make_arrow_dataset(16, 32, seed=3)
    b, lb = make_arrow_dataset(16, 32, seed=3)
    c, _ = make_arrow_dataset(16, 32, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_balanced_and_labels_match_geometry():
    ds = ArrowPointing(200, 32, seed=0)
    labels = [ds.scene(i).label for i in range(len(ds))]
    assert sum(labels) == 100
    for i in range(0, 200, 7):
        s = ds.scene(i)
        # recompute the label independently: sample points along the ray and test disk membership
        tail, tip, c = np.array(s.tail), np.array(s.tip), np.array(s.center)
        d = (tip - tail) / np.linalg.norm(tip - tail)
        ts = np.linspace(0, 3, 30001)
        pts = tip[None] + ts[:, None] * d[None]
        hit = (np.linalg.norm(pts - c[None], axis=1) <= s.radius).any()
        assert hit == bool(s.label) == bool(ds[i][1])


def test_constructed_examples():
    # arrow along +x at y = 0.5
    assert points_at((0.1, 0.5), (0.3, 0.5), (0.8, 0.5), 0.1)
    assert points_at((0.1, 0.5), (0.3, 0.5), (0.8, 0.58), 0.1)  # off-centre but within the radius
    assert not points_at((0.1, 0.5), (0.3, 0.5), (0.8, 0.62), 0.1)  # just misses
    assert not points_at((0.3, 0.5), (0.1, 0.5), (0.8, 0.5), 0.1)  # points away
    assert points_at((0.5, 0.9), (0.5, 0.7), (0.5, 0.1), 0.05)  # straight up (y grows downwards)
    assert points_at((0.2, 0.2), (0.3, 0.3), (0.8, 0.8), 0.05)  # diagonal
    assert not points_at((0.2, 0.2), (0.3, 0.3), (0.8, 0.2), 0.05)


def test_rendering_shows_the_scene():
    s = ArrowScene(tail=(0.1, 0.5), tip=(0.4, 0.5), center=(0.8, 0.5), radius=0.1,
                   arrow_color=(1.0, 0.0, 0.0), circle_color=(0.0, 0.0, 1.0))
    img = render(s, 40)
    assert img.shape == (3, 40, 40) and img.dtype == np.float32
    assert img[0, 20, 10] > 0.5 and img[2, 20, 10] == 0  # arrow shaft is red
    assert img[2, 20, 32] > 0.9 and img[0, 20, 32] == 0  # circle centre is blue
    assert img[:, 2, 2].max() == 0  # background


def test_same_scene_at_any_resolution():
    hi, _ = make_arrow_dataset(8, 64, seed=1)
    lo, _ = make_arrow_dataset(8, 32, seed=1)
    down = F.avg_pool2d(hi, 2)
    assert (down - lo).abs().mean() < 0.02
    with pytest.raises(ValueError):
        render(ArrowPointing(2, 32).scene(0), 4)


def test_fast_generator_matches_reference_renderer_and_geometry():
    from plstm_graph.datasets.arrows import make_arrow_dataset_fast, render_batch, sample_scenes

    sc = sample_scenes(41, seed=5)  # odd size: labels 0, 1, ..., 0
    assert sc["label"].tolist() == [i % 2 for i in range(41)]
    batch = render_batch(sc, 24, chunk=7)  # chunk not dividing n
    for i in range(41):
        s = ArrowScene(tuple(sc["tail"][i]), tuple(sc["tip"][i]), tuple(sc["center"][i]), float(sc["radius"][i]),
                       tuple(sc["arrow_color"][i]), tuple(sc["circle_color"][i]))
        assert s.label == sc["label"][i]  # the label agrees with the reference geometry
        along = np.dot(np.array(s.center) - s.tip, (np.array(s.tip) - s.tail) / np.linalg.norm(np.subtract(s.tip, s.tail)))
        assert np.allclose(render(s, 24), batch[i], atol=1e-6)
        assert 0.06 <= s.radius <= 0.12 and 0.2 - 1e-9 <= np.linalg.norm(np.subtract(s.tip, s.tail)) <= 0.35 + 1e-9
        assert (along > 0) if s.label else True
    x, y = make_arrow_dataset_fast(8, 32, seed=5)
    x2, y2 = make_arrow_dataset_fast(8, 32, seed=5)
    hi, _ = make_arrow_dataset_fast(8, 64, seed=5)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.dtype == torch.float32 and y.dtype == torch.long
    assert (F.avg_pool2d(hi, 2) - x).abs().mean() < 0.02  # same scenes at any resolution
    assert not torch.equal(x, make_arrow_dataset_fast(8, 32, seed=6)[0])
    with pytest.raises(ValueError):
        sample_scenes(0)
