"""The AMC strategy: its gymnasium environment, its stable-baselines3 agent, and RL searches.

Real parts throughout: real profiles and cost models, real pruning and MAC counting, real SB3
agents, real searches through the CLI. Only the learning test scores plans with a stand-in whose
optimum is known, so that "the agent learned" is something a test can check.
"""

import json
import subprocess
import sys
import warnings

import gymnasium
import numpy as np
import optuna
import pytest
from conftest import mlflow_runs, run_cli
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import autoprune as ap
from autoprune.space import RLSettings
from autoprune.strategies.rl.agent import CHECKPOINT_FILE, run_agent
from autoprune.strategies.rl.env import ENV_ID, FEATURES, PruningEnv, TrialFailed
from autoprune.study import completed_trials
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


def test_import_registers_the_env_without_importing_stable_baselines3():
    code = ("import sys, gymnasium, autoprune; "
            "assert 'autoprune/Pruning-v0' in gymnasium.registry; "
            "assert 'stable_baselines3' not in sys.modules, 'import autoprune imported SB3'")
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
    trials = completed_trials(study)
    assert len(trials) == 30
    for t in trials:  # the trial's parameters are the agent's (clipped) choices
        assert t.params == pytest.approx(t.user_attrs["raw_ratios"])
        assert t.user_attrs["plan"]["provenance"]["strategy"] == "rl/ddpg"
    state = json.loads(next((workdir / "strategy-state").rglob(CHECKPOINT_FILE)).read_text())
    assert state["episodes"] == 30 and state["agent"] == "ddpg"


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
