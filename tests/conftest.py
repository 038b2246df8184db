"""Tiny datasets made here, in the real MuJoCo env, in every format the loaders read. No network."""

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")


def random_rollouts(env_id="Hopper-v4", steps=2000, seed=0, max_len=200):
    """Random-policy transitions as D4RL flat arrays; episodes are cut at termination or `max_len`
    (a timeout), and the buffer stops mid-episode, like a real replay buffer."""
    import gymnasium as gym

    env = gym.make(env_id)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    out = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    t = 0
    for _ in range(steps):
        a = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        nxt, r, term, trunc, _ = env.step(a)
        t += 1
        timeout = (trunc or t >= max_len) and not term
        for k, v in zip(out, (obs, a, r, term, timeout)):
            out[k].append(v)
        obs = nxt
        if term or timeout:
            obs, _ = env.reset()
            t = 0
    return dict(
        observations=np.array(out["observations"], np.float32),
        actions=np.array(out["actions"], np.float32),
        rewards=np.array(out["rewards"], np.float32),
        terminals=np.array(out["terminals"]),
        timeouts=np.array(out["timeouts"]),
    )


def write_hdf5(path, data):
    import h5py

    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny test models run faster on one thread (no gain from a second core, and contention on a
    busy machine); torch's setting is restored after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def default_stop_signals():
    """Every test starts with SIGTERM and SIGUSR1 at their defaults and leaves them as it found
    them: a library started by an earlier test (Ray's init installs a SIGTERM handler) must not
    change what a run restores."""
    import signal

    names = [n for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n)]
    before = {n: signal.signal(getattr(signal, n), signal.SIG_DFL) for n in names}
    yield
    for n, handler in before.items():
        signal.signal(getattr(signal, n), handler)


@pytest.fixture(scope="session")
def flat():
    return random_rollouts()


@pytest.fixture(scope="session")
def hdf5_path(tmp_path_factory, flat):
    return write_hdf5(tmp_path_factory.mktemp("d4rl") / "hopper_random-v2.hdf5", flat)


@pytest.fixture(scope="session")
def pickle_path(tmp_path_factory, flat):
    """The decision-transformer repo's layout: a list of per-episode dicts."""
    ends = np.flatnonzero(flat["terminals"] | flat["timeouts"]) + 1
    ends = np.append(ends, len(flat["rewards"])) if ends[-1] != len(flat["rewards"]) else ends
    paths, start = [], 0
    for end in ends:
        paths.append(
            {k: flat[k][start:end] for k in ("observations", "actions", "rewards", "terminals")}
        )
        start = end
    path = tmp_path_factory.mktemp("dt") / "hopper-random-v2.pkl"
    path.write_bytes(pickle.dumps(paths))
    return path


@pytest.fixture(scope="session")
def minari_id(tmp_path_factory):
    """A local Minari dataset (3 short random episodes in Hopper-v4) in a private
    MINARI_DATASETS_PATH."""
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    os.environ["MINARI_DATASETS_PATH"] = str(tmp_path_factory.mktemp("minari"))
    env, rng, buffers = gym.make("Hopper-v4"), np.random.default_rng(0), []
    for ep in range(3):
        obs, _ = env.reset(seed=ep)
        o, a, r, te, tr = [obs], [], [], [], []
        for t in range(60):
            act = rng.uniform(-1, 1, 3).astype(np.float32)
            obs, rew, term, trunc, _ = env.step(act)
            (
                o.append(obs),
                a.append(act),
                r.append(rew),
                te.append(term),
                tr.append(trunc or t == 59),
            )
            if term or t == 59:
                break
        buffers.append(
            EpisodeBuffer(
                observations=np.array(o),
                actions=np.array(a),
                rewards=np.array(r),
                terminations=np.array(te),
                truncations=np.array(tr),
            )
        )
    dataset_id = "seqrltest/hopper/random-v0"
    minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        env="Hopper-v4",
        algorithm_name="random",
        ref_min_score=-20.272305,
        ref_max_score=3234.3,
    )
    return dataset_id


@pytest.fixture
def env_rewards(monkeypatch):
    """From now on every env that common.make_env makes logs its rewards: one list per env, in
    creation order."""
    import gymnasium as gym

    import common

    make_env, logs = common.make_env, []

    class RewardLog(gym.Wrapper):
        def step(self, action):
            step = self.env.step(action)
            self.log.append(float(step[1]))
            return step

    def logged_env(info, video=None):
        env = RewardLog(make_env(info, video))
        env.log = []
        logs.append(env.log)
        return env

    monkeypatch.setattr(common, "make_env", logged_env)
    return logs


def interrupt_after(cmd, marker: str, log_path, settle_s: float = 3.0, timeout_s: float = 180.0):
    """Run a script as a user would, press Ctrl-C (SIGINT) `settle_s` seconds after `marker` appears
    in its output, and return (exit code, output). The output goes to a file, not a pipe, so nothing
    the script leaves behind can hold the pipe open; SIGINT is restored to its default in the child,
    whatever the test runner set."""
    import signal
    import subprocess
    import time

    with open(log_path, "w") as log:
        default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                preexec_fn=default_sigint)  # fmt: skip
        try:
            deadline = time.time() + timeout_s
            while marker not in open(log_path).read():
                assert proc.poll() is None and time.time() < deadline, open(log_path).read()
                time.sleep(0.2)
            time.sleep(settle_s)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, open(log_path).read()
