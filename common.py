"""Shared by every method file: dataset names, loading (D4RL hdf5, DT pickle, Minari), evaluation
env ids and D4RL normalized scores; and the one rule for where the analyses write (output_folder).
Nothing else lives here, so each method file stays readable on its own.

A dataset is returned as a list of episodes (dicts of numpy arrays: observations (T, m_s), actions
(T, m_a), rewards (T,), and a bool `terminated`) plus an `info` dict that says where it came from
and how to evaluate on it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np

# --- names, environments, reference returns -------------------------------------------------------

D4RL_ENVS = ("halfcheetah", "hopper", "walker2d")
D4RL_LEVELS = ("random", "medium", "medium-replay", "medium-expert", "expert")
D4RL_DATASETS = tuple(f"{e}-{lvl}" for e in D4RL_ENVS for lvl in D4RL_LEVELS)

# One table from D4RL domain to everything evaluation needs. The v2 datasets were collected on gym's
# `*-v3` MuJoCo envs; gymnasium's `*-v4` has the same model and observation layout and is the
# closest env we can run. Reference returns are D4RL's (infos.py), used by normalized_score.
D4RL_TABLE = {
    #  domain         eval env            obs  act  ref_min_score  ref_max_score
    "halfcheetah": dict(
        env_id="HalfCheetah-v4", obs_dim=17, act_dim=6, ref_min=-280.178953, ref_max=12135.0
    ),
    "hopper": dict(env_id="Hopper-v4", obs_dim=11, act_dim=3, ref_min=-20.272305, ref_max=3234.3),
    "walker2d": dict(env_id="Walker2d-v4", obs_dim=17, act_dim=6, ref_min=1.629008, ref_max=4592.3),
}

D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/"
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


class DatasetError(ValueError):
    """Bad dataset name, file or content. The message says what was wrong and how to fix it."""


def parse_name(name: str) -> tuple[str, str]:
    """'hopper-medium-replay[-v2]' -> ('d4rl', 'hopper-medium-replay'); 'ns/env/name-v0' ->
    ('minari', id)."""
    if "/" in name:
        return "minari", name
    base = name[:-3] if name.endswith("-v2") else name
    if base in D4RL_DATASETS:
        return "d4rl", base
    raise DatasetError(
        f"unknown dataset {name!r}. Valid D4RL names (optionally with '-v2'): "
        f"{', '.join(D4RL_DATASETS)}; or a Minari id such as 'mujoco/hopper/medium-v0'."
    )


def d4rl_filename(base: str) -> str:
    """Official file name: hopper-medium-replay -> hopper_medium_replay-v2.hdf5."""
    domain, level = base.split("-", 1)
    return f"{domain}_{level.replace('-', '_')}-v2.hdf5"


def d4rl_dir() -> Path:
    return Path(os.environ.get("D4RL_DATASET_DIR", Path.home() / ".d4rl" / "datasets")).expanduser()


# How a dataset's `info["source"]` is named in printed results
SOURCE_LABEL = {
    "d4rl": "official D4RL",
    "minari": "Minari",
    "replica": "replica",
    "file": "local file",
}


def normalized_score(info: dict, returns) -> np.ndarray:
    """D4RL normalized score 100 * (R - min) / (max - min); NaN where the dataset has no reference
    returns."""
    returns = np.asarray(returns, dtype=np.float64)
    if info.get("ref_min") is None or info.get("ref_max") is None:
        return np.full_like(returns, np.nan)
    return 100.0 * (returns - info["ref_min"]) / (info["ref_max"] - info["ref_min"])


def episode_scores(info: dict, returns, lengths, elapsed_s: float) -> dict:
    """What every method file's evaluation reports: each episode's return, length and normalized
    score, their means, the normalized score's std over episodes, and env steps per second."""
    returns, lengths = np.asarray(returns, dtype=np.float64), np.asarray(lengths)
    score = normalized_score(info, returns)
    episodes = {
        "returns": returns.tolist(),
        "lengths": lengths.tolist(),
        "normalized": score.tolist(),
    }
    means = {"return_mean": float(returns.mean()), "normalized_mean": float(score.mean())}
    speed = {"eval_env_steps_per_s": float(lengths.sum() / max(elapsed_s, 1e-9))}
    return {**episodes, **means, "normalized_std": float(score.std()), **speed}


# --- download -------------------------------------------------------------------------------------


def download(url: str, dest: Path) -> Path:
    """Download `url` to `dest` with a progress bar. The file appears under its final name only once
    the whole body arrived (written to a temporary file in the same folder, then renamed
    atomically)."""
    from tqdm import tqdm

    # removed again if it fails
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
            if total is not None and bar.n != total:
                raise OSError(f"connection closed after {bar.n} of {total} bytes")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        for folder in made:  # a failed first download leaves no empty ~/.d4rl/datasets behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return dest


def find_d4rl_file(base: str) -> Path:
    """$D4RL_DATASET_DIR (default ~/.d4rl/datasets)/official name, downloaded there if missing."""
    folder, fname = d4rl_dir(), d4rl_filename(base)
    path = folder / fname
    if path.exists():
        return path
    try:
        return download(D4RL_URL + fname, path)
    except Exception as e:  # no network, HTTP error, disk full: one message that says what to do
        raise DatasetError(
            f"could not find or download the D4RL file {fname!r} for dataset {base!r}.\n"
            f"  looked in: {folder} (set $D4RL_DATASET_DIR to change it)\n"
            f"  download from {D4RL_URL + fname} failed: {e}\n"
            f"  fix: download that file elsewhere and put it in {folder}, or pass --dataset-path "
            "FILE (a D4RL-layout .hdf5 or a DT .pkl)."
        ) from None


# --- readers --------------------------------------------------------------------------------------


def episode(observations, actions, rewards, terminated) -> dict:
    """One episode as every reader returns it: (T, m_s), (T, m_a), (T,) arrays and whether it
    terminated."""
    return dict(
        observations=observations, actions=actions, rewards=rewards, terminated=bool(terminated)
    )


def split_episodes(obs, act, rew, terminals, timeouts) -> list[dict]:
    """D4RL flat arrays -> episodes. An episode ends at a terminal OR a timeout; the last,
    unfinished episode (the buffer stopped mid-episode) is kept."""
    ends = np.flatnonzero(np.logical_or(terminals, timeouts)) + 1
    # an empty file gives no episodes, not one empty one
    if len(obs) and (len(ends) == 0 or ends[-1] != len(obs)):
        ends = np.append(ends, len(obs))
    starts = np.concatenate([[0], ends[:-1]]).astype(int)
    return [episode(obs[a:b], act[a:b], rew[a:b], terminals[b - 1]) for a, b in zip(starts, ends)]


def read_hdf5(path: Path) -> list[dict]:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(
            f"{path}: not a readable hdf5 file ({e}). Pass a D4RL-layout .hdf5 or a DT .pkl."
        ) from None
    with f:
        missing = [k for k in D4RL_KEYS if k not in f]
        if missing:
            raise DatasetError(
                f"{path}: missing key(s) {missing}; a D4RL hdf5 needs {list(D4RL_KEYS)} (found "
                f"{sorted(f.keys())})."
            )
        try:
            data = {k: f[k][()] for k in D4RL_KEYS}
        except OSError as e:
            # e.g. a compressed chunk that no longer decodes; h5py's message names no file
            raise DatasetError(
                f"{path}: the file is damaged, its data cannot be read ({e}). Download or copy it "
                "again; a partial copy or a disk error leaves a file like this."
            ) from None
    n = len(data["observations"])
    bad = {k: len(v) for k, v in data.items() if len(v) != n}
    if bad:
        raise DatasetError(
            f"{path}: arrays of different lengths: observations {n}, "
            + ", ".join(f"{k} {v}" for k, v in bad.items())
        )
    for k in ("rewards", "terminals", "timeouts"):
        # one number per step: (N,) or (N, 1), never flattened silently
        if data[k].size != n:
            raise DatasetError(
                f"{path}: {k} has shape {data[k].shape}; a D4RL file has one value per step, shape "
                f"({n},)."
            )
    if n and not (data["terminals"].any() or data["timeouts"].any()):
        raise DatasetError(
            f"{path}: no step is marked as an episode end (terminals and timeouts are all false); "
            "a D4RL file ends every episode with one of them. Mark the ends, or check the file."
        )
    return split_episodes(
        data["observations"], data["actions"], *(data[k].reshape(-1) for k in D4RL_KEYS[2:])
    )


def read_pickle(path: Path) -> list[dict]:
    """The decision-transformer repo's layout: a list of per-episode dicts with observations,
    actions, rewards and terminals (or dones)."""
    try:
        with open(path, "rb") as f:
            paths = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise DatasetError(
            f"{path}: not a readable pickle ({type(e).__name__}: {e}). Pass a D4RL-layout .hdf5 or "
            "a DT .pkl."
        ) from None
    if not isinstance(paths, list) or not all(isinstance(p, dict) for p in paths):
        raise DatasetError(
            f"{path}: a DT pickle must hold a list of per-episode dicts, found "
            f"{type(paths).__name__}."
        )
    episodes = []
    for i, p in enumerate(paths):
        term_key = "terminals" if "terminals" in p else "dones"
        missing = [k for k in ("observations", "actions", "rewards", term_key) if k not in p]
        if missing:
            raise DatasetError(
                f"{path}: episode {i} lacks key(s) {missing}; each needs observations, actions, "
                "rewards, terminals."
            )
        lens = {k: len(p[k]) for k in ("observations", "actions", "rewards", term_key)}
        if len(set(lens.values())) != 1:
            raise DatasetError(f"{path}: episode {i} has arrays of different lengths {lens}.")
        if np.asarray(p["rewards"]).size != lens["rewards"]:
            raise DatasetError(
                f"{path}: episode {i}'s rewards have shape {np.shape(p['rewards'])}; one value per "
                "step."
            )
        if lens["observations"] == 0:
            continue
        obs, act, rew = (np.asarray(p[k]) for k in ("observations", "actions", "rewards"))
        episodes.append(episode(obs, act, rew.reshape(-1), np.asarray(p[term_key])[-1]))
    return episodes


def read_minari(dataset_id: str) -> tuple[list[dict], dict]:
    """A Minari dataset: local if present, else downloaded by minari (needs a network)."""
    import minari

    try:
        ds = minari.load_dataset(
            dataset_id, download=dataset_id not in minari.list_local_datasets()
        )
    except Exception as e:
        raise DatasetError(
            f"could not load Minari dataset {dataset_id!r}: {e}\n"
            "  fix: check the id (`minari list remote`), or download it where there is a network "
            "(`minari download ID`) and set $MINARI_DATASETS_PATH."
        ) from None
    # The method files feed flat vectors; a Dict/image dataset would otherwise fail deep inside
    # numpy.
    if not all(
        type(sp).__name__ == "Box" and len(sp.shape) == 1
        for sp in (ds.observation_space, ds.action_space)
    ):
        raise DatasetError(
            f"Minari dataset {dataset_id!r} has observations {ds.observation_space} and actions "
            f"{ds.action_space}; these scripts need flat Box spaces of both (e.g. "
            "mujoco/hopper/medium-v0)."
        )
    # Minari stores T+1 observations (the last one after the final action); drop it.
    episodes = [
        episode(ep.observations[:-1], ep.actions, ep.rewards, ep.terminations[-1])
        for ep in ds.iterate_episodes()
    ]
    spec, meta = ds.spec.env_spec, ds.storage.metadata
    ref = {"ref_min": meta.get("ref_min_score"), "ref_max": meta.get("ref_max_score")}
    return episodes, dict(
        env_id=spec.id, env_kwargs=dict(spec.kwargs or {}), obs_dim=None, act_dim=None, **ref
    )


# --- the one entry point --------------------------------------------------------------------------


def check_episodes(episodes: list[dict], info: dict, where: str) -> None:
    if not episodes:
        raise DatasetError(f"{where}: the dataset holds no transitions.")
    obs_dim, act_dim = info["obs_dim"], info["act_dim"]
    for i, ep in enumerate(episodes):
        o, a = ep["observations"], ep["actions"]
        if o.ndim != 2 or a.ndim != 2 or len(o) != len(a) or len(o) != len(ep["rewards"]):
            raise DatasetError(
                f"{where}: episode {i} has shapes observations {o.shape}, actions {a.shape}, "
                f"rewards {ep['rewards'].shape}."
            )
        if obs_dim is not None and o.shape[1] != obs_dim:
            raise DatasetError(
                f"{where}: observations have {o.shape[1]} dims but {info['env_id']} has {obs_dim}; "
                "is this the right --env?"
            )
        if act_dim is not None and a.shape[1] != act_dim:
            raise DatasetError(
                f"{where}: actions have {a.shape[1]} dims but {info['env_id']} has {act_dim}; is "
                "this the right --env?"
            )
        for k in ("observations", "actions", "rewards"):
            if not np.all(np.isfinite(ep[k])):
                raise DatasetError(
                    f"{where}: episode {i} has NaN or inf in {k}; clean the file before training."
                )


def check_against_env(episodes: list[dict], info: dict, paths: list[str]) -> None:
    """Cheap checks that D4RL-layout data belongs to the env it will be evaluated in (dimensions
    alone cannot tell walker2d from halfcheetah: both are 17/6):
    - a file whose name names another D4RL domain is refused;
    - actions must lie in the env's action box [-1, 1] (the action heads are tanh-bounded, TRDT's
      regions cover [-1, 1] only);
    - physics: a few dataset transitions are replayed in the env from the dataset's own state (the
      MuJoCo state is the observation with the x position, which no reward here depends on, set to
      0) and must land near the dataset's next observation.
    What they cannot catch: data of the right domain but another version or another reward (e.g. a
    modified env whose dynamics match), or a file that mixes envs in its later episodes (only the
    first ones are replayed)."""
    domain = info["env_id"].split("-")[0].lower()
    for p in paths:
        named = [d for d in D4RL_ENVS if d in Path(p).name.lower() and d != domain]
        if named:
            raise DatasetError(
                f"{p}: the file name says {named[0]}, but --env is a {domain} dataset "
                f"({info['name']}); pass the --env of the data, or rename the file if its name is "
                "wrong."
            )
    worst = max(float(np.abs(ep["actions"]).max()) for ep in episodes)
    if worst > 1 + 1e-3:
        raise DatasetError(
            f"{', '.join(paths) or info['name']}: actions reach {worst:.3g}, outside "
            f"{info['env_id']}'s action box [-1, 1]; the action heads are tanh-bounded and TRDT's "
            "regions cover [-1, 1]. Rescale the actions into the box."
        )
    env, gaps = make_env(info), []
    inner = env.unwrapped
    # obs = (qpos without the x position, qvel) for hopper, walker2d, halfcheetah
    nq = inner.model.nq
    for ep in [ep for ep in episodes if len(ep["rewards"]) > 1][:5]:
        env.reset(seed=0)
        obs = ep["observations"]
        inner.set_state(np.concatenate([[0.0], obs[0][: nq - 1]]), obs[0][nq - 1 :])
        nxt = env.step(ep["actions"][0])[0]
        gaps.append(np.linalg.norm(nxt - obs[1]) / (np.linalg.norm(obs[1] - obs[0]) + 1e-6))
    env.close()
    # matching physics gives ~0; another robot gives ~1 or more
    if gaps and float(np.median(gaps)) > 0.5:
        raise DatasetError(
            f"{', '.join(paths) or info['name']}: the data does not move like {info['env_id']}: "
            f"replaying {len(gaps)} of its transitions in the env misses the next state by "
            f"{np.median(gaps):.2f}x the step's own change (median). Is --env the dataset's domain?"
        )


def load_dataset(
    name: str, dataset_path: tuple[str, ...] | list[str] | str | None = ()
) -> tuple[list[dict], dict]:
    """Episodes and info for a dataset name. D4RL order: `dataset_path` (one or several .hdf5 / .pkl
    files, concatenated, e.g. medium + expert = medium-expert), else the official file in
    $D4RL_DATASET_DIR, else download it there. Minari ids go to minari."""
    source, base = parse_name(name)
    paths = [dataset_path] if isinstance(dataset_path, str) else list(dataset_path or [])
    if source == "minari":
        if paths:
            raise DatasetError(
                f"--dataset-path is for D4RL names; {name!r} is a Minari id (drop --dataset-path)."
            )
        episodes, info = read_minari(base)
        info.update(name=base, source="minari", path=None)
    else:
        info = dict(D4RL_TABLE[base.split("-")[0]], env_kwargs={}, name=base)
        if paths:
            # A file whose path says "replica" (the replica datasets, see README) is labelled so:
            # its numbers must never pass for official D4RL ones.
            resolved = [str(Path(p).resolve()) for p in paths]
            info.update(
                source="replica" if any("replica" in p for p in resolved) else "file", path=resolved
            )
        else:
            paths = [find_d4rl_file(base)]
            info.update(source="d4rl", path=[str(paths[0])])
        episodes = []
        for p in map(Path, paths):
            if not p.exists():
                raise DatasetError(f"--dataset-path {p}: no such file.")
            reader = read_pickle if p.suffix in (".pkl", ".pickle") else read_hdf5
            episodes += reader(p)
    check_episodes(episodes, info, where=", ".join(info["path"] or [name]))
    for ep in episodes:
        for k in ("observations", "actions", "rewards"):
            ep[k] = np.asarray(ep[k], dtype=np.float32)
    if source == "d4rl":
        check_against_env(episodes, info, paths if info["source"] != "d4rl" else [])
    info["obs_dim"], info["act_dim"] = (
        episodes[0]["observations"].shape[1],
        episodes[0]["actions"].shape[1],
    )
    info["episodes"], info["transitions"] = (
        len(episodes),
        int(sum(len(ep["rewards"]) for ep in episodes)),
    )
    return episodes, info


@contextlib.contextmanager
def no_settotalmass_warning():
    """Recent MuJoCo (4.0 here) warns, each time it compiles gymnasium's half_cheetah.xml (every
    HalfCheetah env, so several per run), that the xml's `<compiler settotalmass="14">` is
    deprecated. The attribute still applies: the masses are the ones D4RL's data was collected with,
    which is why the v4 xml is kept. So that one warning is dropped while an env is made; MuJoCo's
    other warnings still print."""
    try:
        import mujoco

        previous = mujoco.get_mju_user_warning()
    except (ImportError, AttributeError):
        # no MuJoCo, or one too old for the hook (and the warning)
        yield
        return

    def handler(message: str) -> None:
        if "settotalmass" in message:
            return
        if previous is not None:
            previous(message)
        else:  # MuJoCo's own default: the message on stderr
            print(f"WARNING: {message}", file=sys.stderr)

    mujoco.set_mju_user_warning(handler)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def gym_make(info: dict, render_mode: str | None = None):
    """gym.make of the dataset's eval env, without the two warnings that would only mislead."""
    with warnings.catch_warnings(), no_settotalmass_warning():
        # gymnasium suggests v5 for every v4 env; v4 is chosen on purpose (the model and observation
        # layout of the gym v3 envs D4RL v2 was collected in), so the advice would only mislead.
        warnings.filterwarnings(
            "ignore", message=r".*is out of date\. You should consider upgrading"
        )
        return gym.make(info["env_id"], render_mode=render_mode, **info.get("env_kwargs", {}))


def make_env(info: dict, video: str | None = None):
    """The evaluation env for a dataset (gymnasium `*-v4` for D4RL v2 data, the dataset's own for
    Minari); with `video`, a path, its first episode is rendered offscreen and written there as an
    MP4."""
    env = gym_make(info, render_mode="rgb_array" if video else None)
    return env if video is None else FirstEpisodeVideo(env, video)


class FirstEpisodeVideo(gym.Wrapper):
    """The first episode, rendered frame by frame into an MP4 (30 fps) as it runs; closed when it
    ends."""

    def __init__(self, env, path: str):
        super().__init__(env)
        self.path, self.writer, self.done = path, None, False

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        if not self.done:
            import imageio

            self.writer = self.writer or imageio.get_writer(self.path, fps=30, macro_block_size=1)
            self.writer.append_data(self.env.render())
        return out

    def step(self, action):
        out = self.env.step(action)
        if not self.done:
            self.writer.append_data(self.env.render())
            if out[2] or out[3]:
                self.finish()
        return out

    def finish(self):
        if self.writer is not None and not self.done:
            self.writer.close()
        self.done = True

    def close(self):
        self.finish()
        super().close()


def check_video(info: dict) -> None:
    """Fail early, with what to install, when --capture-video cannot work here: an MP4 writer and an
    OpenGL backend for MuJoCo's offscreen renderer (headless machines: MUJOCO_GL=egl or osmesa, set
    before MuJoCo is imported)."""
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise DatasetError(
            '--capture-video needs imageio and imageio-ffmpeg: pip install -e ".[video]"'
        ) from None
    try:
        probe = gym_make(info, render_mode="rgb_array")
        probe.reset(seed=0)
        frame = probe.render()
        probe.close()
    except Exception as e:
        # GLFW without a display, a missing libEGL / libOSMesa: each raises its own type
        raise DatasetError(
            "--capture-video: MuJoCo cannot render offscreen here "
            f"(MUJOCO_GL={os.environ.get('MUJOCO_GL', 'unset')}: {type(e).__name__}: {e}). On a "
            "machine without a display set MUJOCO_GL=egl (Debian/Ubuntu packages libegl1 "
            "libgl1-mesa-dri) or MUJOCO_GL=osmesa (libosmesa6) before running."
        ) from None
    if frame is None or frame.ndim != 3:
        raise DatasetError(f"--capture-video: {info['env_id']} renders no RGB frames.")


# --- where the analyses write --------------------------------------------------------------------


def output_folder(out: str | None, name: str, force: bool = False, flag: str = "--out") -> Path:
    """The folder an analysis (benchmarks/, theory_*.py, sample_complexity.py) writes into: `out`,
    else a new runs/{name}__{unix time}, so that no default command ever writes over committed
    results (benchmarks/results/ is regenerated only by naming it). Checked before any work and not
    made here: the caller makes it when it first writes, so a refused or failed run leaves nothing
    behind. Refused, with one line: a folder that already holds files (unless `force`), a file, a
    path under a file, a place this user cannot write."""
    path = Path(out).expanduser() if out else Path("runs") / f"{name}__{int(time.time())}"
    where = f"{flag} {out}" if out else f"output folder {path}"
    if path.is_file():
        raise SystemExit(f"error: {where}: is a file, not a folder; pass a new folder.")
    if path.is_dir() and not force and any(path.iterdir()):
        raise SystemExit(
            f"error: {where}: the folder exists and holds files; pass a new folder, or add --force "
            "to overwrite the files of the same name (nothing is overwritten otherwise)."
        )
    parent = path
    while not parent.exists():  # the nearest existing folder: the first new one would be made in it
        parent = parent.parent
    if not parent.is_dir():
        raise SystemExit(
            f"error: {where}: {parent} is a file, so no folder can be made under it; pass another "
            "path."
        )
    # os.access trusts permission bits (root passes them all); only making something tells for sure
    try:
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as e:
        raise SystemExit(
            f"error: {where}: cannot write in {parent} ({e.strerror}); pass a folder you can write."
        ) from None
    return path


# --- memory: the flags that size a run, checked before it starts ----------------------------------
#
# A --batch-size or --eval-episodes too large for the machine is refused before the run folder is
# made, in one line that names the flag, its value and a value that fits (check_memory); an
# estimate cannot be exact, so what it misses is caught when it happens (out_of_memory). The
# estimate is of the peak memory a step adds to what the run already holds (dataset, model). Its
# constants were measured on this project's CPU (torch 2.13): the rise of a fresh process's peak RSS
# over one update of dt.py's model, at 7 configurations (batch x tokens x width x layers x heads
# from 64 x 60 x 128 x 3 x 1 to 512 x 60 x 256 x 4 x 4, 64 x 300 x 128 x 3 x 4 and 256 x 60 x
# 128 x 6 x 8), fp32 and bf16. A least-squares fit of
#     bytes = 4 * batch * layers * (a * tokens * width + b * heads * tokens^2)
# gives the values below; it is within 0.91-1.05x of every measured peak (fp32 153 MB to 3.1 GB).
# a counts the values autograd keeps per token, channel and layer (about 16 in theory: LayerNorm
# in and out, QKV, attention output, projection, MLP hidden before and after ReLU, residuals,
# dropout masks), b those per attention weight (scores, softmax, dropout mask and output of the
# math path SDPA takes on a CPU with a mask and dropout).
TRAIN_VALUES = {"fp32": (22.0, 3.2), "bf16": (16.0, 3.7)}
# A no-grad forward (evaluation) keeps one layer's transients: 12 values per token and channel
# (measured: 0.68-1.05x of the peaks of 1000-2000 x 60 and 500 x 180-300 tokens); CPU attention then
# runs fused, with no weights stored.
INFER_VALUES = 12.0
# One evaluation env, measured once: a gymnasium MuJoCo env (Hopper-v4, HalfCheetah-v4, Walker2d-v4)
# adds 1.1 MB to this process's RSS (500 envs, 300 steps); with --eval-async each is a forked
# process whose own (private) pages are 8.3-8.6 MB (16 envs, 300 steps), counted as 10 MB.
ENV_BYTES = {"sync": 1.1e6, "async": 10e6}
# Refused only when the estimate exceeds the free memory by this factor: larger than the estimate's
# worst overshoot of a measured peak (1.05x), so a refused run would not have fit.
MEMORY_MARGIN = 1.2


def available_memory(device) -> int | None:
    """Bytes this process can still allocate on `device` (a torch.device or its name): on CUDA the
    free memory of the GPU, on the CPU MemAvailable of /proc/meminfo or, when lower, what the cgroup
    (container) limit leaves; None where it cannot be read (the checks then pass)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    if kind != "cpu":
        return None
    free = [read_meminfo("MemAvailable")]
    for limit_file, usage_file in CGROUP_FILES:
        free.append(cgroup_free(Path(limit_file), Path(usage_file)))
    free = [f for f in free if f is not None]
    return min(free) if free else None


# cgroup v2, then v1: the limit and the usage of the container's memory
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def read_meminfo(key: str) -> int | None:
    """A /proc/meminfo field in bytes (None off Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_free(limit_file: Path, usage_file: Path) -> int | None:
    """The cgroup's limit minus its working set (usage less the inactive file cache, which the
    kernel reclaims before it kills); None without a limit ("max", or v1's huge number)."""
    try:
        limit, usage = limit_file.read_text().strip(), int(usage_file.read_text())
    except (OSError, ValueError):
        return None
    if not limit.isdigit() or int(limit) >= 1 << 60:
        return None
    inactive = 0
    with contextlib.suppress(OSError, ValueError):
        for line in (limit_file.parent / "memory.stat").read_text().splitlines():
            key, value = line.split()
            if key in ("inactive_file", "total_inactive_file"):
                inactive = int(value)
    return max(0, int(limit) - max(0, usage - inactive))


def transformer_bytes(
    batch: int,
    tokens: int,
    n_embd: int,
    n_layer: int,
    n_head: int,
    *,
    bf16: bool,
    train=True,
    device="cpu",
) -> float:
    """Estimated peak memory of one update (`train`: forward and backward of `batch` sequences of
    `tokens` tokens, plus weights, gradients and two Adam moments of 12 n_layer n_embd^2 parameters)
    or of one no-grad forward, of a GPT of pre-LN blocks (the constants above). On CUDA the
    attention kernels store no weights, only the mask as a float bias (1 value per token pair):
    unmeasured, as no GPU has been available, and lower than the CPU's, so it refuses less."""
    if not train:
        return 4.0 * INFER_VALUES * batch * tokens * n_embd
    a, b = TRAIN_VALUES["bf16" if bf16 else "fp32"]
    cpu = getattr(device, "type", str(device).split(":")[0]) == "cpu"
    per_layer = a * tokens * n_embd + (b * n_head if cpu else 1.0) * tokens**2
    return 4.0 * (batch * n_layer * per_layer + 4 * 12 * n_layer * n_embd**2)


def eval_env_bytes(episodes: int, asynchronous: bool) -> float:
    """Memory of an evaluation's vector env of `episodes` MuJoCo envs (ENV_BYTES)."""
    return episodes * ENV_BYTES["async" if asynchronous else "sync"]


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_memory(flag: str, value: int, need: float, device, what: str) -> None:
    """Refuse, in one line naming the flag, its value and a value that fits, a run whose `need`
    (bytes, an estimate that grows about linearly with the flag's value) exceeds the memory
    available on `device` by MEMORY_MARGIN; call it before the run folder is made."""
    free = available_memory(device)
    if free is None or need <= MEMORY_MARGIN * free:
        return
    fits = max(1, int(value * free / need))
    raise SystemExit(
        f"error: {flag} {value}: {what} needs about {gigabytes(need)}, more than the "
        f"{gigabytes(free)} of memory available on {device}; lower {flag} (about {fits} fits) "
        "or free memory."
    )


def check_needs(needs: dict, device) -> None:
    """check_memory for each memory-bound flag of a run: `needs` maps flag -> (value, bytes, what
    it sizes), as the method files' memory_needs give it."""
    for flag, (value, need, what) in needs.items():
        check_memory(flag, value, need, device, what)


def is_out_of_memory(e: BaseException) -> bool:
    """torch's CUDA OutOfMemoryError, its CPU allocator's failure, numpy's MemoryError, a fork
    refused for memory (ENOMEM)."""
    if isinstance(e, MemoryError):
        return True
    if isinstance(e, OSError):
        return e.errno == errno.ENOMEM
    text = str(e).lower()
    return isinstance(e, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


@contextlib.contextmanager
def out_of_memory(flag: str, value: int, device, what: str, run_dir: Path | None = None):
    """An allocation failure inside becomes one line naming the flag and its value, in place of a
    traceback from inside torch; `run_dir`, the run's folder, is removed if nothing was logged in
    it yet, else it keeps what it logged (the line says which)."""
    try:
        yield
    except (RuntimeError, MemoryError, OSError) as e:
        if not is_out_of_memory(e):
            raise
        where = "" if run_dir is None else f"; {run_dir} {drop_if_unused(run_dir)}"
        raise SystemExit(
            f"error: {flag} {value}: out of memory on {device} in {what}; lower {flag}{where}."
        ) from None


def drop_if_unused(run_dir: Path) -> str:
    """Remove a run folder that holds no more than its config.json and an empty metrics.jsonl;
    says what became of it."""
    files = {f.name: f.stat().st_size for f in run_dir.iterdir()} if run_dir.is_dir() else {}
    if set(files) <= {"config.json", "metrics.jsonl"} and not files.get("metrics.jsonl"):
        shutil.rmtree(run_dir, ignore_errors=True)
        return "held nothing yet and is removed"
    return "keeps what it logged"
