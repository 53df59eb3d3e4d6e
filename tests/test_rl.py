"""The AMC strategy: its gymnasium environment, its stable-baselines3 agent, and RL searches.

Real parts throughout: real profiles and cost models, real pruning and MAC counting, real SB3
agents, real searches through the CLI. Only the learning test scores plans with a stand-in whose
optimum is known, so that "the agent learned" is something a test can check.
"""

import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import warnings
from operator import attrgetter

import gymnasium
import numpy as np
import optuna
import pytest
import torch
from conftest import mlflow_runs, run_cli
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import autoprune as ap
from autoprune.space import RLSettings
from autoprune.strategies.rl._checkpoint import _CheckpointStore
from autoprune.strategies.rl.agent import CHECKPOINT_FILE, AgentState, _model_factory, _new_model, run_agent
from autoprune.strategies.rl.env import ENV_ID, FEATURES, PruningEnv, TrialFailed
from autoprune.study import completed_trials, read_record
from autoprune.task import dense_model


class StandIn:
    """A cheap ``evaluate_fn``: scores a plan with ``score(plan)``; after ``episodes`` plans it
    answers ``None`` (the search is over), as the search runner does when the study is full."""

    def __init__(self, score=lambda plan: 0.9, episodes: int | None = None) -> None:
        self.score = score
        self.episodes = episodes
        self.plans: list[ap.Plan] = []
        self.raws: list[dict[str, float]] = []

    def __call__(self, plan: ap.Plan, raw: dict[str, float]) -> ap.TrialResult | None:
        if self.episodes is not None and len(self.plans) >= self.episodes:
            return None
        self.plans.append(plan)
        self.raws.append(dict(raw))
        m = plan.metrics
        return ap.TrialResult(val_score=self.score(plan), macs=m["flops"], macs_ratio=m["flops_ratio"],
                              params=m["params"], params_ratio=m["params_ratio"], seconds=0.0)


def play(env: PruningEnv, policy) -> tuple[list[dict], float]:
    """One episode with ``policy(step, obs) -> action in [-1, 1]``; (infos of every step, final reward)."""
    obs, _ = env.reset()
    infos, rewards, done = [], [], False
    while not done:
        assert env.observation_space.contains(obs)
        obs, reward, done, truncated, info = env.step(np.array([policy(len(infos), obs)], dtype=np.float32))
        assert not truncated
        infos.append(info)
        rewards.append(reward)
    assert rewards[:-1] == [0.0] * (len(rewards) - 1)  # AMC: only the last step is rewarded
    assert len(infos) == env.steps_per_episode
    return infos, rewards[-1]


@pytest.fixture(scope="module")
def resnet():
    """ResNet-20 (untrained: budgets do not depend on weights), its example input and profile."""
    model, x = dense_model("fashionmnist-resnet20", pretrained=False)
    return model, x, ap.profile_model(model, x)


@pytest.fixture(scope="module")
def digits_model():
    model, x = dense_model("digits-cnn", pretrained=False)
    return model, x


def test_import_registers_the_env_without_importing_stable_baselines3_plotting_or_export():
    # The CLI imports the package: one fresh interpreter checks both. SB3, matplotlib (~0.8 s) and
    # torch.export's sympy (~0.5 s) are imported when an agent trains, a figure is drawn or a model
    # exported; every other command, `--help` included, must not wait for them.
    code = ("import sys, gymnasium, autoprune.cli; "
            "assert 'autoprune/Pruning-v0' in gymnasium.registry; "
            "loaded = sorted(m for m in ('matplotlib', 'sympy', 'stable_baselines3') if m in sys.modules); "
            "assert not loaded, f'import autoprune.cli imported {loaded}'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_env_passes_the_gymnasium_and_sb3_checkers(digits_task, digits_profile):
    env = gymnasium.make(ENV_ID, task=digits_task, profile=digits_profile, budget={"flops": 0.5},
                         evaluate_fn=StandIn())
    assert env.observation_space.shape == (len(FEATURES),) == (11,)
    assert env.observation_space.dtype == np.float32 and env.action_space.shape == (1,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checker's warning is a failure here
        gymnasium_check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env.unwrapped, warn=True)


def test_make_by_task_name_scores_with_its_own_evaluator(session_workdir, digits_task):
    env = gymnasium.make(ENV_ID, task="digits-cnn", budget={"flops": 0.5}, workdir=str(session_workdir))
    infos, reward = play(env.unwrapped, lambda t, obs: 0.0)
    last = infos[-1]
    result, plan = last["result"], last["plan"]
    assert 0.5 < result.val_score <= 1.0
    assert reward == pytest.approx(-(1.0 - result.val_score))  # AMC's resource-constrained reward
    assert result.macs_ratio <= 0.5 and plan.metrics["flops_ratio"] <= 0.5
    assert list(last["raw"]) == env.unwrapped.profile.names  # one step per group, in network order
    assert not any("result" in i for i in infos[:-1])
    with pytest.raises(RuntimeError, match="reset"):
        env.unwrapped.step(np.zeros(1, np.float32))


@pytest.mark.parametrize("model_name, budget", [("digits", ap.Budget(flops=0.5)), ("digits", ap.Budget(params=0.4)),
                                                ("resnet", ap.Budget(flops=0.4))])
def test_every_episode_plan_meets_the_budget_by_counted_macs(model_name, budget, digits_model, resnet):
    model, x, profile = (*digits_model, ap.profile_model(*digits_model)) if model_name == "digits" else resnet
    dense_macs, dense_params = ap.count_macs_params(model, x)
    limit = budget.value * (dense_macs if budget.metric == "flops" else dense_params)
    rng = np.random.default_rng(0)
    n_random = 6 if model_name == "digits" else 4  # ResNet-20's pruned copies take longer to build
    policies = [lambda t, o: -1.0, lambda t, o: 1.0] + [lambda t, o: rng.uniform(-1, 1)] * n_random
    env = PruningEnv(profile=profile, budget=budget, evaluate_fn=StandIn())
    for policy in policies:
        infos, _ = play(env, policy)
        plan = infos[-1]["plan"]
        macs, params = ap.count_macs_params(ap.apply_plan(model, plan, example_input=x), x)
        counted = macs if budget.metric == "flops" else params
        assert counted <= limit, plan.ratios
        assert counted >= 0.95 * limit, "the projection should use the budget, not undershoot it"
        # the raw ratios the agent chose stay inside each group's range
        assert all(0.0 <= r <= 0.8 + 1e-9 for r in infos[-1]["raw"].values())


def test_amc_clipping_prunes_enough_even_when_every_action_asks_for_least(resnet):
    model, x, profile = resnet
    budget = ap.Budget(flops=0.4)
    env = PruningEnv(profile=profile, budget=budget, evaluate_fn=StandIn())
    infos, _ = play(env, lambda t, obs: -1.0)
    ratios = [i["ratio"] for i in infos]
    assert all(i["wanted"] == 0.0 for i in infos)  # -1 maps to the range's low end, 0
    assert any(r > 0 for r in ratios), "no step was clipped, yet pruning nothing cannot meet 40% MACs"
    assert ratios[0] == 0.0, "the first groups need no clipping: the later ones can still prune"
    for info in infos:  # each step's ratio is exactly AMC's bound: raised only as far as needed
        assert info["ratio"] == pytest.approx(info["min_ratio"])
    macs, _ = ap.count_macs_params(ap.apply_plan(model, infos[-1]["plan"], example_input=x), x)
    assert macs <= 0.4 * profile.macs


def test_failed_and_stopped_episodes(digits_profile):
    def failing(plan, raw):
        raise TrialFailed("evaluation crashed")

    env = PruningEnv(profile=digits_profile, budget={"flops": 0.5}, evaluate_fn=failing)
    infos, reward = play(env, lambda t, obs: 0.0)
    assert infos[-1]["failed"] and reward == -1.0  # a failed candidate counts as scoring 0
    env = PruningEnv(profile=digits_profile, budget="flops=0.5", evaluate_fn=StandIn(episodes=0))
    infos, reward = play(env, lambda t, obs: 0.0)
    assert infos[-1]["stopped"] and reward == 0.0 and "result" not in infos[-1]
    flops_env = PruningEnv(profile=digits_profile, budget={"flops": 0.5}, evaluate_fn=StandIn(lambda p: 0.9),
                           reward="flops")
    infos, reward = play(flops_env, lambda t, obs: 0.0)
    assert reward == pytest.approx(-0.1 * np.log(infos[-1]["result"].macs))
    for bad, error, match in [({"reward": "accuracy"}, ap.ConfigError, "allowed: error, flops"),
                              ({"budget": None}, ap.ConfigError, "budget"),
                              ({"budget": {"flops": 0.01}}, ap.InfeasibleBudgetError, "cannot be met")]:
        kwargs = {"profile": digits_profile, "budget": {"flops": 0.5}, "evaluate_fn": StandIn(), **bad}
        with pytest.raises(error, match=match):
            PruningEnv(**kwargs)


def test_the_agent_finds_a_known_optimum_better_than_random_search(digits_profile):
    """Score = 1 - mean squared distance of the plan's ratios to an optimum that meets the budget."""
    budget = ap.Budget(flops=0.5)
    names = digits_profile.names
    optimum = ap.project(digits_profile, {"conv1": 0.6, "conv2": 0.2, "conv3": 0.55, "fc1": 0.1}, budget)
    target = np.array([optimum.ratios[n] for n in names])

    def distance(plan: ap.Plan) -> float:
        return float(np.mean((np.array([plan.ratios[n] for n in names]) - target) ** 2))

    episodes, agent_best, random_best = 100, [], []
    for seed in range(3):
        agent = StandIn(lambda p: 1.0 - distance(p), episodes=episodes)
        state = run_agent(PruningEnv(profile=digits_profile, budget=budget, evaluate_fn=agent), seed=seed)
        assert state.stopped and state.episodes == episodes == len(agent.plans)
        agent_best.append(min(distance(p) for p in agent.plans))

        rand = StandIn(lambda p: 1.0 - distance(p), episodes=episodes)
        env, rng = PruningEnv(profile=digits_profile, budget=budget, evaluate_fn=rand), np.random.default_rng(100 + seed)
        for _ in range(episodes):
            play(env, lambda t, obs: rng.uniform(-1, 1))
        random_best.append(min(distance(p) for p in rand.plans))
    wins = sum(a < r for a, r in zip(agent_best, random_best))
    assert np.mean(agent_best) < np.mean(random_best) and wins >= 2, (agent_best, random_best)


def test_demonstrated_episodes_play_the_baseline_plans_first_and_a_resumed_agent_skips_them(
        digits_profile, digits_evaluator, tmp_path):
    budget = ap.Budget(flops=0.3)
    baselines = [ap.uniform_plan(digits_profile, budget),
                 ap.global_plan(digits_profile, budget, digits_evaluator.scores)]
    assert baselines[0].channels != baselines[1].channels
    env = PruningEnv(profile=digits_profile, budget=budget, evaluate_fn=StandIn(episodes=5))
    demonstrations = [env.actions_for(plan.ratios) for plan in baselines]
    assert all(a.shape == (env.steps_per_episode,) and np.all(np.abs(a) <= 1) for a in demonstrations)

    stand_in = StandIn(episodes=5)
    env = PruningEnv(profile=digits_profile, budget=budget, evaluate_fn=stand_in)
    state = run_agent(env, RLSettings(**SMALL), demonstrations=demonstrations)
    assert state.episodes == 5
    # Played through clipping and projection, each baseline plan comes out as itself.
    assert [p.channels for p in stand_in.plans[:2]] == [b.channels for b in baselines]
    assert all(p.channels not in [b.channels for b in baselines] for p in stand_in.plans[2:])

    # Stopped after the first demonstration, a resumed agent plays the second one next, once.
    first = StandIn(episodes=1)
    run_agent(PruningEnv(profile=digits_profile, budget=budget, evaluate_fn=first), RLSettings(**SMALL),
              state_dir=tmp_path, demonstrations=demonstrations)
    rest = StandIn(episodes=3)
    state = run_agent(PruningEnv(profile=digits_profile, budget=budget, evaluate_fn=rest), RLSettings(**SMALL),
                      state_dir=tmp_path, demonstrations=demonstrations)
    assert state.resumed and state.episodes == 4
    assert [p.channels for p in first.plans + rest.plans[:1]] == [b.channels for b in baselines]
    assert all(p.channels not in [b.channels for b in baselines] for p in rest.plans[1:])


def test_the_same_seed_proposes_the_same_plans(digits_profile):
    def sequence(seed: int) -> list[tuple[int, ...]]:
        stand_in = StandIn(lambda p: 1.0 - abs(p.ratios["conv2"] - 0.3), episodes=20)
        run_agent(PruningEnv(profile=digits_profile, budget={"flops": 0.5}, evaluate_fn=stand_in),
                  RLSettings(warmup_episodes=5, gradient_steps_per_episode=5), seed=seed)
        return [tuple(p.kept.values()) for p in stand_in.plans]

    first = sequence(3)
    assert first == sequence(3)
    assert first[5:] != sequence(4)[5:]


def test_cli_rl_search_tracks_every_episode_as_a_trial(workdir):
    done = run_cli("search", "--strategy", "rl", "--trials", "30", "--workdir", str(workdir))
    assert done.returncode == 0, done.stderr
    client, parents, children = mlflow_runs(workdir)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(parents) == 1 and len(finished) == 30
    assert all(c.data.metrics["macs_ratio"] <= 0.5 for c in finished)
    parent = parents[0].info.run_id
    rewards = client.get_metric_history(parent, "agent/episode/reward")
    assert sorted(m.step for m in rewards) == list(range(1, 31))
    assert client.get_metric_history(parent, "agent/train/critic_loss"), "SB3's losses reach the parent run"
    study = optuna.load_study(study_name="digits-cnn-rl-flops0.5", storage=f"sqlite:///{workdir / 'optuna.db'}")
    trials = sorted(completed_trials(study), key=attrgetter("number"))
    assert len(trials) == 30
    for t in trials:  # the trial's parameters are the agent's (clipped) choices
        assert t.params == pytest.approx(t.user_attrs["raw_ratios"])
    # The first episodes play the baseline plans, labelled as in an Optuna study; the summary takes
    # their scores from those trials instead of evaluating the plans again.
    assert [t.user_attrs.get("baseline") for t in trials[:2]] == ["uniform", "global"]
    assert [t.user_attrs["plan"]["provenance"]["strategy"] for t in trials] == ["uniform", "global"] + ["rl/ddpg"] * 28
    record = read_record(study)
    assert record.baseline_scores["uniform"] == trials[0].user_attrs["result"]
    assert record.baseline_scores["global"] == trials[1].user_attrs["result"]
    state = json.loads(next((workdir / "strategy-state").rglob(CHECKPOINT_FILE)).read_text())
    assert state["episodes"] == 30 and state["agent"] == "ddpg"


def test_an_episode_that_repeats_an_evaluated_plan_uses_no_trial(workdir, tmp_path):
    # With almost no exploration noise the actor proposes the same plan episode after episode.
    space = tmp_path / "rl-quiet.yaml"
    space.write_text(
        "task: digits-cnn\nbudget: {flops: 0.5}\n"
        "evaluation: {calibration_batches: 4, val_samples: 500}\n"
        "strategy: {name: rl, trials: 4, rl: {warmup_episodes: 0, noise_sigma: 0.01, gradient_steps_per_episode: 5, "
        "batch_size: 16}}\n"
    )
    result = ap.search(space, workdir=workdir, show_progress=False)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    trials = completed_trials(study)
    plans = {json.dumps(t.user_attrs["plan"]["channels"], sort_keys=True) for t in trials}
    assert len(trials) == 4 and len(plans) == 4  # every trial a distinct candidate
    episodes = json.loads(next((workdir / "strategy-state").rglob(CHECKPOINT_FILE)).read_text())["episodes"]
    assert episodes > 4  # the repeats were played, answered from the study
    client, parents, _ = mlflow_runs(workdir, experiment="rl-quiet")
    (repeated,) = client.get_metric_history(parents[0].info.run_id, "agent/repeated_plans")
    assert repeated.value == episodes - 4


def test_a_policy_that_only_repeats_itself_still_ends_the_search(workdir, tmp_path, monkeypatch):
    from autoprune.strategies.rl import agent

    monkeypatch.setattr(agent, "MAX_FREE_REPEATS", 2)
    space = tmp_path / "rl-stuck.yaml"
    space.write_text(
        "task: digits-cnn\nbudget: {flops: 0.5}\n"
        "evaluation: {calibration_batches: 4, val_samples: 500}\n"
        "strategy: {name: rl, trials: 5, rl: {warmup_episodes: 0, noise_sigma: 1.0e-6, gradient_steps_per_episode: 1, "
        "learning_rate_actor: 1.0e-9, batch_size: 16}}\n"
    )
    result = ap.search(space, workdir=workdir, show_progress=False)
    assert result.n_finished == 5
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    plans = [json.dumps(t.user_attrs["plan"]["channels"], sort_keys=True) for t in completed_trials(study)]
    assert len(set(plans)) < 5  # past two repeats in a row, the repeat was run as a trial
    client, parents, _ = mlflow_runs(workdir, experiment="rl-stuck")
    (repeated,) = client.get_metric_history(parents[0].info.run_id, "agent/repeated_plans")
    assert 0 < repeated.value <= 2 * 5  # at most two free repeats before each trial


def test_an_rl_search_run_again_with_more_trials_resumes_its_agent(workdir, tmp_path):
    space = tmp_path / "rl.yaml"
    space.write_text(
        "task: digits-cnn\nbudget: {flops: 0.5}\n"
        "evaluation: {calibration_batches: 4, val_samples: 500}\n"
        "strategy: {name: rl, trials: 4, rl: {warmup_episodes: 2, gradient_steps_per_episode: 5, batch_size: 16}}\n"
    )
    first = ap.search(space, workdir=workdir, show_progress=False)
    assert first.n_finished == 4
    pointer = next((workdir / "strategy-state").rglob(CHECKPOINT_FILE))
    assert json.loads(pointer.read_text())["episodes"] == 4

    second = ap.search(space, n_trials=7, workdir=workdir, show_progress=False)
    assert second.n_finished == 7 and second.study_name == first.study_name
    study = optuna.load_study(study_name=second.study_name, storage=second.storage_url)
    assert len(completed_trials(study)) == 7
    state = json.loads(pointer.read_text())
    # A fresh agent would count 3 episodes and have decayed its noise once (episode 3 > warm-up 2).
    assert state["episodes"] == 7
    assert state["noise_sigma"] == pytest.approx(RLSettings().noise_sigma * RLSettings().noise_decay ** 5)
    client, parents, _ = mlflow_runs(workdir, experiment="rl")  # named after the space file
    assert len(parents) == 1  # the resumed search continues its parent run
    steps = [m.step for m in client.get_metric_history(parents[0].info.run_id, "agent/episode/reward")]
    assert sorted(steps) == list(range(1, 8))

    with pytest.raises(ap.ConfigError, match="agent is 'ddpg'"):
        ap.search(space, n_trials=8, agent="td3", workdir=workdir, show_progress=False)

    # A new study under the same name (the old one deleted) starts a fresh agent: the old checkpoint
    # belonged to the deleted study, and would even refuse this run's agent.
    optuna.delete_study(study_name=second.study_name, storage=second.storage_url)
    third = ap.search(space, n_trials=2, agent="td3", workdir=workdir, show_progress=False)
    assert third.n_finished == 2 and third.study_name == first.study_name
    state = json.loads(pointer.read_text())
    assert state["episodes"] == 2 and state["agent"] == "td3"


# A few episodes on the digits profile: cheap enough to checkpoint several agents in one test.
SMALL = {"warmup_episodes": 2, "gradient_steps_per_episode": 3, "batch_size": 8}


class Planted:
    """What an attacker would plant in a workdir: unpickling it runs ``touch marker``."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def checkpointed_agent(profile, state_dir, episodes: int = 3) -> dict:
    """Run a small DDPG agent for ``episodes`` with a checkpoint in ``state_dir``; the pointer JSON."""
    env = PruningEnv(profile=profile, budget={"flops": 0.5}, evaluate_fn=StandIn(episodes=episodes))
    run_agent(env, RLSettings(**SMALL), state_dir=state_dir)
    return json.loads((state_dir / CHECKPOINT_FILE).read_text())


def resume(profile, state_dir, episodes: int = 1) -> AgentState:
    env = PruningEnv(profile=profile, budget={"flops": 0.5}, evaluate_fn=StandIn(episodes=episodes))
    return run_agent(env, RLSettings(**SMALL), state_dir=state_dir)


def test_a_resumed_agent_refuses_planted_pickles_without_unpickling_them(digits_profile, tmp_path):
    marker = tmp_path / "planted-code-ran"
    payload = pickle.dumps(Planted(marker))
    # The payload is live: unpickled anywhere, it creates the marker.
    done = subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                          input=payload, capture_output=True, timeout=60)
    assert done.returncode == 0 and marker.exists(), done.stderr
    marker.unlink()

    state = tmp_path / "state"
    meta = checkpointed_agent(digits_profile, state)
    assert meta["schema"] == "autoprune.rl-agent/2"
    folder = state / meta["checkpoint"]
    assert sorted(p.name for p in folder.iterdir()) == ["agent.pt", "replay_buffer.npz"]
    good = {name: (folder / name).read_bytes() for name in ("agent.pt", "replay_buffer.npz")}

    def refused(path) -> None:
        with pytest.raises(ap.CheckpointError, match=re.escape(str(path))) as caught:
            resume(digits_profile, state)
        message = str(caught.value)
        assert f"Delete {state} to start the agent afresh" in message and "finished trials are kept" in message
        assert not marker.exists(), "a planted pickle ran"

    # In place of the new files: raw pickles, a torch file of objects, an .npz of an object array.
    torch_payload, npz_payload = tmp_path / "planted.pt", tmp_path / "planted.npz"
    torch.save({"policy": Planted(marker)}, torch_payload)
    np.savez(npz_payload, observations=np.array([Planted(marker)], dtype=object))
    for name, planted in [("agent.pt", payload), ("agent.pt", torch_payload.read_bytes()),
                          ("replay_buffer.npz", payload), ("replay_buffer.npz", npz_payload.read_bytes())]:
        for file, content in good.items():
            (folder / file).write_bytes(content)
        (folder / name).write_bytes(planted)
        refused(folder / name)

    # The old format (SB3's agent.zip and replay_buffer.pkl), named by an old or a new pointer JSON.
    for file in good:
        (folder / file).unlink()
    old_meta = {**{k: meta[k] for k in ("checkpoint", "agent", "steps_per_episode", "episodes", "noise_sigma",
                                        "num_timesteps")}, "schema": "autoprune.rl-agent/1"}
    for pointer in (old_meta, meta):
        (state / CHECKPOINT_FILE).write_text(json.dumps(pointer))
        (folder / "replay_buffer.pkl").write_bytes(payload)
        refused(folder / "replay_buffer.pkl")
        (folder / "agent.zip").write_bytes(payload)
        refused(folder / "agent.zip")
        for file in ("agent.zip", "replay_buffer.pkl"):
            (folder / file).unlink()

    # With its own files back, the same checkpoint resumes: the refusals were about the plants.
    (state / CHECKPOINT_FILE).write_text(json.dumps(meta))
    for file, content in good.items():
        (folder / file).write_bytes(content)
    resumed = resume(digits_profile, state)
    assert resumed.resumed and resumed.episodes == meta["episodes"] + 1
    assert not marker.exists()


def test_a_checkpoint_that_does_not_fit_the_agent_is_refused(digits_profile, tmp_path):
    state = tmp_path / "state"
    meta = checkpointed_agent(digits_profile, state)
    folder = state / meta["checkpoint"]
    agent_file, buffer_file = folder / "agent.pt", folder / "replay_buffer.npz"
    good_agent, good_buffer = agent_file.read_bytes(), buffer_file.read_bytes()

    tensors = torch.load(agent_file, weights_only=True)
    key = next(k for k, t in tensors["policy"].items() if t.dim() == 2)
    tensors["policy"][key] = tensors["policy"][key].t().contiguous()  # a weight of other layer sizes
    torch.save(tensors, agent_file)
    with pytest.raises(ap.CheckpointError, match=re.escape(f"{agent_file} does not fit") + f".*{re.escape(key)}"):
        resume(digits_profile, state)
    del tensors["critic.optimizer"]
    torch.save(tensors, agent_file)
    with pytest.raises(ap.CheckpointError, match=re.escape(f"{agent_file} does not fit")):
        resume(digits_profile, state)
    agent_file.write_bytes(good_agent)

    with np.load(buffer_file) as archive:
        arrays = dict(archive)
    short = {**arrays, "observations": arrays["observations"][..., :-1]}  # one feature fewer per slot
    np.savez(buffer_file, **short)
    with pytest.raises(ap.CheckpointError, match=re.escape(f"{buffer_file} does not fit") + ".*observations"):
        resume(digits_profile, state)
    np.savez(buffer_file, **{**arrays, "pos": np.int64(10**6)})
    with pytest.raises(ap.CheckpointError, match=re.escape(f"{buffer_file} does not fit") + ".*pos"):
        resume(digits_profile, state)
    buffer_file.write_bytes(good_buffer)
    assert resume(digits_profile, state).resumed


@pytest.mark.parametrize("agent", ["ddpg", "td3", "sac"])
def test_a_checkpoint_round_trip_restores_weights_optimizers_and_replay_buffer(agent, digits_profile, tmp_path):
    # A buffer of 3 episodes that 5 episodes overfill: its wrapped position and "full" are saved too.
    settings = RLSettings(agent=agent, buffer_episodes=3, **SMALL)
    env = PruningEnv(profile=digits_profile, budget={"flops": 0.5},
                     evaluate_fn=StandIn(lambda p: 1.0 - abs(p.ratios["conv2"] - 0.3)))
    steps = env.steps_per_episode
    model = _new_model(env, settings, seed=0)
    model.learn(total_timesteps=5 * steps)
    assert model._n_updates > 0 and model.replay_buffer.full and model.replay_buffer.pos == (5 * steps) % (3 * steps)
    store = _CheckpointStore(tmp_path / "state")
    store.save(model, AgentState(episodes=5, noise_sigma=0.5), settings, steps)

    fresh_env = PruningEnv(profile=digits_profile, budget={"flops": 0.5}, evaluate_fn=StandIn())
    loaded, state = store.load(_model_factory(fresh_env, settings, seed=0), settings, fresh_env.steps_per_episode,
                               seed=0)
    assert state == AgentState(episodes=5, noise_sigma=0.5, resumed=True)
    assert loaded is not model and loaded.env is not model.env

    saved_weights, loaded_weights = model.policy.state_dict(), loaded.policy.state_dict()
    assert list(saved_weights) == list(loaded_weights)
    assert any(k.startswith("critic_target.") for k in saved_weights)  # targets are in the policy's state dict
    for key, tensor in saved_weights.items():
        assert torch.equal(tensor, loaded_weights[key]), key

    optimizers = ["actor.optimizer", "critic.optimizer"] + (["ent_coef_optimizer"] if agent == "sac" else [])
    for name in optimizers:
        saved_opt, loaded_opt = attrgetter(name)(model).state_dict(), attrgetter(name)(loaded).state_dict()
        assert saved_opt["param_groups"] == loaded_opt["param_groups"], name
        assert saved_opt["state"] and list(saved_opt["state"]) == list(loaded_opt["state"]), name
        for index, entry in saved_opt["state"].items():
            assert list(entry) == list(loaded_opt["state"][index])
            for key, value in entry.items():
                assert torch.equal(value, loaded_opt["state"][index][key]), (name, index, key)
        # The optimizers step the loaded agent's own parameters (the state was copied in, in place).
        live = {id(p) for p in loaded.policy.parameters()} | {id(getattr(loaded, "log_ent_coef", None))}
        assert all(id(p) in live for g in attrgetter(name)(loaded).param_groups for p in g["params"]), name
    if agent == "sac":
        assert model.log_ent_coef.item() != 0.0  # learned away from its initial log(1)
        assert torch.equal(model.log_ent_coef, loaded.log_ent_coef)
        assert loaded.ent_coef_optimizer.param_groups[0]["params"][0] is loaded.log_ent_coef
    else:
        np.testing.assert_array_equal(loaded.action_noise._sigma, [0.5])

    saved_buffer, loaded_buffer = model.replay_buffer, loaded.replay_buffer
    for key in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts", "complete"):
        saved_array, loaded_array = getattr(saved_buffer, key), getattr(loaded_buffer, key)
        assert loaded_array.dtype == saved_array.dtype and np.array_equal(loaded_array, saved_array), key
    assert (loaded_buffer.pos, loaded_buffer.full) == (saved_buffer.pos, saved_buffer.full)
    assert saved_buffer.complete.all() and loaded_buffer.open_episode == []

    assert (loaded.num_timesteps, loaded._n_updates, loaded._episode_num) == (
        model.num_timesteps, model._n_updates, model._episode_num)
    assert list(loaded.ep_info_buffer) == list(model.ep_info_buffer) and len(model.ep_info_buffer) == 5
    obs = np.stack([saved_buffer.observations[i, 0] for i in range(3)])
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
