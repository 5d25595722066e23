import numpy as np

from raysft.stats import add_hist, histogram, length_summary, packing_figures


def test_summary_matches_numpy():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 5000, size=12345)
    s = length_summary(histogram(lengths))
    assert s["count"] == len(lengths)
    assert abs(s["mean"] - lengths.mean()) < 1e-3
    assert abs(s["std"] - lengths.std()) < 1e-3
    assert s["min"] == lengths.min() and s["max"] == lengths.max()
    for k, q in (("p25", 25), ("p50", 50), ("p75", 75), ("p99", 99)):
        assert abs(s[k] - np.percentile(lengths, q)) < 1e-3, k


def test_hist_merge_and_packing_figures():
    a, b = histogram([1, 2, 2]), histogram([5])
    assert add_hist(a, b).tolist() == [0, 1, 2, 0, 0, 1]
    f = packing_figures(tokens=1000, packs=3, seq_length=400)
    assert f["lower_bound_packs"] == 3 and abs(f["packing_efficiency"] - 1000 / 1200) < 1e-6
