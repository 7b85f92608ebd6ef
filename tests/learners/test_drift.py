"""The drift detector: detects a clear shift within its delay, stays quiet on a stationary
stream, honours min length and cool-down, and survives a state_dict round trip."""

import torch
import torch.nn.functional as F

from learners.drift import BANDWIDTH_SCALES, DriftDetector

DIM = 64
PER_STEP = 4  # embeddings per step (TAILORD_DRIFT_SAMPLE 0.125 of 32 stream images)
IMAGES = 32  # stream images per step


def features(generator: torch.Generator, shift: float = 0.0) -> torch.Tensor:
    """(PER_STEP, DIM) unit vectors of one of two clusters of noisy embeddings."""
    x = torch.randn(PER_STEP, DIM, generator=generator)
    x[:, 0] += shift
    return F.normalize(x, dim=1)


def stream(detector: DriftDetector, steps: int, shift_at: int | None, seed: int = 0) -> list[int]:
    """Feed `steps` steps (shifted from step `shift_at`); the images at which boundaries were cut."""
    generator = torch.Generator().manual_seed(seed)
    cuts = []
    for step in range(steps):
        shifted = shift_at is not None and step >= shift_at
        if detector.update(features(generator, 4.0 if shifted else 0.0), IMAGES) is not None:
            cuts.append((step + 1) * IMAGES)  # images seen when it cut
            detector.boundary("drift")
    return cuts


def test_detects_a_clear_shift_within_500_images():
    for seed in range(3):
        cuts = stream(DriftDetector(seed=seed), 200, shift_at=100, seed=seed)
        assert len(cuts) == 1
        assert 0 <= cuts[0] - 100 * IMAGES <= 500


def test_no_boundary_on_a_stationary_stream():
    for seed in range(3):
        detector = DriftDetector(seed=seed)
        assert stream(detector, 600, shift_at=None, seed=seed) == []  # 19,200 images
        assert detector.statistic < detector.threshold


def test_min_length_holds_a_cut_back():
    detector = DriftDetector(min_images=100 * IMAGES + 2000, cooldown_images=0)
    cuts = stream(detector, 200, shift_at=100)
    assert cuts and cuts[0] >= 100 * IMAGES + 2000  # persistent shift: cut once the experience is long enough


def test_cooldown_after_a_drift_boundary():
    detector = DriftDetector(cooldown_images=3000, min_images=0)
    stream(detector, 40, shift_at=None)
    detector.boundary("drift")  # the last drift boundary is now
    generator = torch.Generator().manual_seed(1)
    cuts = []
    for step in range(150):  # the stream flips every 10 steps: clearly shifting all the time
        shift = 4.0 if (step // 10) % 2 else 0.0
        if detector.update(features(generator, shift), IMAGES) is not None:
            cuts.append((step + 1) * IMAGES)  # images seen when it cut
            detector.boundary("drift")
    assert cuts
    assert all(b - a >= 3000 for a, b in zip([0, *cuts], cuts, strict=False))


def test_header_boundary_forgets_count_boundary_keeps():
    detector = DriftDetector()
    stream(detector, 60, shift_at=None)
    assert detector.ready()
    detector.boundary("count")
    assert detector.ready() and detector.images_in_experience == 0
    detector.boundary("header")
    assert not detector.ready()


def test_state_dict_round_trip_continues_identically():
    a = DriftDetector(seed=3)
    stream(a, 80, shift_at=None, seed=3)
    b = DriftDetector(seed=3)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    generator_a, generator_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for step in range(40):
        shift = 4.0 if step >= 10 else 0.0
        assert a.update(features(generator_a, shift), IMAGES) == b.update(features(generator_b, shift), IMAGES)
        assert a.statistic == b.statistic


def test_confirmation_re_embeds_so_an_encoder_change_is_no_shift():
    """The inputs stay stationary but the encoder changes at step 50: stored embeddings alone see a
    shift; re-embedding window and reference with the current encoder (embed=) cuts nothing."""
    def run(confirm: bool) -> int:
        detector, generator = DriftDetector(), torch.Generator().manual_seed(4)
        encoder = {"shift": 0.0}

        def embed(x: torch.Tensor) -> torch.Tensor:  # (n, DIM) -> (n, DIM)
            y = x.clone()
            y[:, 0] += encoder["shift"]
            return F.normalize(y, dim=1)

        cuts = 0
        for step in range(150):
            encoder["shift"] = 4.0 if step >= 50 else 0.0
            x = torch.randn(PER_STEP, DIM, generator=generator)
            if detector.update(embed(x), IMAGES, inputs=x if confirm else None, embed=embed if confirm else None):
                cuts += 1
                detector.boundary("drift")
        return cuts

    assert run(confirm=False) >= 1
    assert run(confirm=True) == 0


def filled(before: int, after: int, shift: float = 4.0, seed: int = 5, reference: int = 128,
           new_in_reference: int = 0) -> DriftDetector:
    """A detector whose reference is `reference` embeddings of cluster 0 (its newest `new_in_reference`
    of the shifted cluster instead) and whose window holds `before` more of cluster 0, then `after` of
    the shifted cluster (window = before + after); one embedding per stream image."""
    detector, generator = DriftDetector(window=before + after, reference=reference), torch.Generator().manual_seed(seed)
    old = torch.randn(reference + before - new_in_reference, DIM, generator=generator)
    new = torch.randn(new_in_reference + after, DIM, generator=generator)
    new[:, 0] += shift
    kept = F.normalize(torch.cat([old, new]), dim=1)  # (reference + window, DIM) in stream order
    detector.past, detector.recent = kept[:reference], kept[reference:]
    positions = torch.arange(len(kept))
    detector.past_positions, detector.recent_positions = positions[:reference], positions[reference:]
    detector.images_seen = detector.images_in_experience = len(kept)
    return detector


def test_change_point_finds_where_the_stream_turns_new():
    for before in (8, 24, 40):  # in the window, after a reference of 128
        assert abs(filled(before, 64 - before).change_point() - (128 + before)) <= 2
    for new_in_reference in (20, 50):  # cut late: the new distribution slid into the reference
        assert abs(filled(0, 64, new_in_reference=new_in_reference).change_point() - (128 - new_in_reference)) <= 2


def test_a_drift_boundary_keeps_only_the_post_change_part_as_reference():
    detector = filled(24, 40)
    assert abs(detector.boundary("drift") - 40) <= 2  # stream images after the change point, handed on
    assert abs(len(detector.past) - 40) <= 2
    assert detector.past[:, 0].min() > 0.2  # every kept embedding is of the shifted cluster (x0 ~ 4/sqrt(DIM+16))
    assert detector.recent is None


def test_a_late_cut_hands_on_the_new_images_in_the_reference_too():
    detector = filled(0, 64, new_in_reference=50)
    assert abs(detector.boundary("drift") - 114) <= 2  # 50 in the reference + the window's 64
    assert len(detector.past) == 64  # the new reference is still the window's post-change part


def test_only_a_drift_boundary_hands_images_on_and_never_more_than_the_experience():
    assert filled(24, 40).boundary("count") == 0
    assert filled(24, 40).boundary("header") == 0
    detector = filled(0, 64, new_in_reference=50)
    detector.images_in_experience = 30  # a count cut 30 images ago: the rest belong to the experience before
    assert detector.boundary("drift") == 30


def test_positions_follow_the_stream_and_survive_a_restart():
    detector = DriftDetector(window=8, reference=16, check_every=100)
    generator = torch.Generator().manual_seed(2)
    for _ in range(8):
        detector.update(features(generator), IMAGES)  # 4 embeddings per 32 images
    assert detector.recent_positions.tolist() == list(range(192, 256, 8))  # the newest 8: 2 steps of 4 per 32 images
    assert detector.past_positions.tolist() == list(range(64, 192, 8))  # the 16 before them
    resumed = DriftDetector(window=8, reference=16, check_every=100)
    resumed.load_state_dict(detector.state_dict())
    assert torch.equal(resumed.past_positions, detector.past_positions) and resumed.images_seen == 256
    old = {k: v for k, v in detector.state_dict().items() if "positions" not in k}
    old["counters"] = old["counters"][:5]  # written before positions were kept
    resumed.load_state_dict(old)
    assert resumed.images_seen == 0 and resumed.boundary("drift") == 0


def test_several_kernel_scales_score_near_duplicates_higher_than_one_wide_kernel():
    """A window of 8 tight clumps (near-duplicate images) against a spread reference: the
    structure is at a scale below the mean pairwise distance, where the narrower kernels look."""
    import learners.drift as drift

    def z(scales: tuple[float, ...]) -> float:
        generator = torch.Generator().manual_seed(11)
        detector = DriftDetector(window=64, reference=128)
        detector.past = F.normalize(torch.randn(128, DIM, generator=generator), dim=1)
        centres = torch.randn(8, DIM, generator=generator).repeat_interleave(8, 0)  # (64, DIM)
        detector.recent = F.normalize(centres + 0.3 * torch.randn(64, DIM, generator=generator), dim=1)
        original, drift.BANDWIDTH_SCALES = drift.BANDWIDTH_SCALES, scales
        try:
            return detector.test()
        finally:
            drift.BANDWIDTH_SCALES = original

    assert z(drift.BANDWIDTH_SCALES) > z((1.0,)) + 3


def test_the_reference_slides_until_a_shift_is_due_then_holds():
    detector = DriftDetector(window=8, reference=16, threshold=1e9, patience=3, check_every=1, min_images=10**9)
    generator = torch.Generator().manual_seed(0)
    stream(detector, 10, shift_at=None)
    detector.threshold = -1e9  # every check now counts as shifted
    kept = []
    for _ in range(4):
        detector.update(features(generator), IMAGES)
        kept.append(detector.past.clone())
    assert detector.streak == 4
    assert not torch.equal(kept[0], kept[1])  # streak 1 and 2: still sliding (no early freeze)
    assert torch.equal(kept[2], kept[3])  # streak >= patience, held back by min_images: frozen


def test_the_permutations_are_drawn_once_per_size_and_keep_the_group_sizes():
    detector = DriftDetector(permutations=50, seed=3)
    weights = detector._permutation_weights(8, 24)
    assert weights.shape == (51, 32)
    assert ((weights > 0).sum(1) == 8).all()  # every relabelling keeps 8 in the window
    assert weights[0, :8].gt(0).all() and weights[0, 8:].lt(0).all()  # row 0: as observed
    assert detector._permutation_weights(8, 24) is weights
    assert not torch.equal(detector._permutation_weights(8, 25)[:, :32], weights)
    assert torch.equal(DriftDetector(permutations=50, seed=3)._permutation_weights(8, 24), weights)  # a restart draws the same


def test_the_kernel_is_the_sum_of_gaussians_at_every_scale():
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    distances = torch.cdist(x, x).pow(2)
    bandwidth = distances.sum() / (50 * 49)
    expected = sum(torch.exp(-distances / (bandwidth * scale)) for scale in BANDWIDTH_SCALES)
    assert torch.allclose(DriftDetector._kernel(x), expected, atol=1e-5)
