"""The worker sizes torch's threads to the CPUs it may use, cgroup quotas included."""

from __future__ import annotations

from pathlib import Path

from inflight.cpus import _cgroup_quota, usable_cpus


def test_cgroup_v2_quota_and_unlimited(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(tmp_path) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_quota(tmp_path) == 4.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_quota(tmp_path) is None


def test_usable_cpus_never_exceeds_the_affinity_mask() -> None:
    import os

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
