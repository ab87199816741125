"""The GPU timeline summaries of worker/step_profiler.py, on hand-made timelines (no GPU needed)."""

from worker.step_profiler import _idle, decode_pair_idle, kernel_timeline

# Four marked steps (markers at 0, 100, 210, 400); the last has no marker after it, so it is incomplete.
SPANS = sorted([(0, 1), (1, 90), (100, 101), (101, 200), (210, 211), (211, 300), (310, 390), (400, 401), (401, 500)])
MARKERS = [0, 100, 210, 400]


def test_idle_between_decode_steps_and_with_the_gaps_inside_the_later_step():
    # Between steps: 90..100 before step 1 and 200..210 before step 2; inside step 2: 300..310. Of 300.
    summary = decode_pair_idle(SPANS, MARKERS, [True, True, True, True])
    assert summary["marked_steps"] == 4 and summary["decode_step_pairs"] == 2
    assert abs(summary["decode_idle_fraction"] - 20 / 300) < 1e-12
    assert abs(summary["decode_idle_fraction_with_kernel_gaps"] - 30 / 300) < 1e-12


def test_a_step_with_a_prompt_chunk_breaks_the_pairs_around_it():
    assert decode_pair_idle(SPANS, MARKERS, [True, False, True, True])["decode_step_pairs"] == 0
    only = decode_pair_idle(SPANS, MARKERS, [False, True, True, True])
    assert only["decode_step_pairs"] == 1 and abs(only["decode_idle_fraction_with_kernel_gaps"] - 20 / 190) < 1e-12
    assert abs(only["decode_idle_fraction"] - 10 / 190) < 1e-12


def test_the_whole_timeline_sorts_its_gaps_by_size():
    summary = _idle([(0, 10), (15, 20), (300, 400), (2000, 2100)])
    assert summary["idle_fraction"] == 1 - 215 / 2100
    assert summary["idle_us_by_gap_size"] == {"up_to_20us": 5, "up_to_200us": 0, "up_to_1000us": 280, "up_to_infus": 1600}


def test_a_tracers_activities_split_into_steps_at_the_marker_kernels():
    # What either tracer hands over: (start, end, name); a CUDA graph launch is one activity with no kernel name.
    marker = "_ZN2at4cuda40_GLOBAL__N__Sleep_cu11spin_kernelEl"
    activity = [(0, 1, marker), (1, 90, ""), (100, 101, marker), (101, 200, ""), (210, 211, marker), (211, 300, ""),
                (310, 390, "gemv"), (400, 401, marker), (401, 500, "")]
    summary = kernel_timeline(activity, [True, True, True, True])
    assert summary["marked_steps"] == 4 and summary["intervals"] == 9
    assert abs(summary["decode_idle_fraction"] - 20 / 300) < 1e-12
    assert kernel_timeline([], [True]) == {"intervals": 0}
