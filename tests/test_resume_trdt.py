"""trdt.py survives its interruptions: the checks of tests/test_resume_mo_dt.py, on trdt.py
(issue 24)."""

import pytest
from test_resume_mo_dt import (
    SIGNALS,
    check_a_stopped_runs_model_is_a_checkpoint,
    check_bad_resumes,
    check_evaluation_leaves_the_random_streams_alone,
    check_kill_during_a_save,
    check_periodic_atomic_saves,
    check_sigterm_then_resume,
    check_signal_on_the_script,
    check_stop_during_an_evaluation,
    lamb_steps,
)

import trdt


@pytest.mark.parametrize("stop_at, flags", [
    (10, {}), (7, dict(schedule="alternating", bins=2)), (7, dict(bf16=False)),
], ids=["at-an-evaluation", "alternating", "fp32"])  # fmt: skip
def test_resumed_run_is_the_uninterrupted_one(tmp_path, hdf5_path, monkeypatch, stop_at, flags):
    saved = check_sigterm_then_resume(trdt, tmp_path, hdf5_path, monkeypatch, stop_at, **flags)
    per_update = len(trdt.TASKS) if flags.get("schedule") == "alternating" else 1
    assert lamb_steps(saved) == {stop_at * per_update}  # LAMB's count: one step per task
    assert saved["arch"]["bins"] == flags.get("bins", 3)


def test_stopped_during_an_evaluation_resumes_with_it(tmp_path, hdf5_path, monkeypatch):
    check_stop_during_an_evaluation(trdt, tmp_path, hdf5_path, monkeypatch)


def test_resume_evaluation_draws_no_training_randomness(tmp_path, hdf5_path, monkeypatch):
    check_evaluation_leaves_the_random_streams_alone(trdt, tmp_path, hdf5_path, monkeypatch)


def test_resume_checkpoints_are_periodic_and_atomic(tmp_path, hdf5_path, monkeypatch):
    check_periodic_atomic_saves(trdt, tmp_path, hdf5_path, monkeypatch)


def test_a_kill_during_a_save_leaves_the_last_checkpoint(tmp_path, hdf5_path):
    check_kill_during_a_save(trdt, tmp_path, hdf5_path)


@pytest.mark.parametrize("sig", SIGNALS)
def test_sigterm_and_sigusr1_print_the_resume_command(tmp_path, hdf5_path, sig):
    check_signal_on_the_script(trdt, tmp_path, hdf5_path, sig)


def test_resume_refuses_what_it_cannot_continue(tmp_path, hdf5_path, monkeypatch):
    check_bad_resumes(trdt, tmp_path, hdf5_path, monkeypatch)


def test_resume_leaves_model_pt_a_valid_checkpoint(tmp_path, hdf5_path, monkeypatch):
    check_a_stopped_runs_model_is_a_checkpoint(trdt, tmp_path, hdf5_path, monkeypatch)
