"""Fuzzed bad input: a few hundred broken search space files and plan files, each invalid by
construction, must each be refused with an AutopruneError (exit 2 and one `error:` message through
the CLI), never a traceback, and nothing written.

The generators are seeded (random.Random(0)), so a failing case is reproduced by its number.
"""

from __future__ import annotations

import json
import random
import string
from typing import Any, Callable

import yaml

import autoprune as ap
from autoprune.cli import run
from autoprune.errors import AutopruneError
from autoprune.plan import check_plan_matches
from autoprune.pruning import IMPORTANCE_NAMES
from autoprune.space import AGENTS, OBJECTIVES, REWARDS, SAMPLERS, STRATEGIES, load_space

N_SPACES = 300
N_PLANS = 300
N_PLANS_THROUGH_CLI = 40

# A valid space with every section and key spelled out, so each mutation below is the only fault.
# Its task (tests/user_tasks.py) raises when it is loaded: a case that got past validation fails
# at once with a message that does not name the file, instead of running a whole search.
PAST_VALIDATION = "my data server is down"
BASE_SPACE: dict[str, Any] = {
    "task": "user_tasks:raises",
    "budget": {"flops": 0.5},
    "groups": {"include": ["*"], "exclude": [], "ratio": [0.0, 0.8], "round_to": 1},
    "evaluation": {"calibration_batches": 16, "val_samples": 2000, "finetune_steps": 0, "importance": "l1"},
    "strategy": {
        "name": "optuna", "sampler": "tpe", "trials": 40, "seed": 0, "objective": "score",
        "rl": {"agent": "ddpg", "warmup_episodes": 10, "noise_sigma": 1.0, "noise_decay": 0.97,
               "buffer_episodes": 200, "learning_rate_actor": 1.0e-4, "learning_rate_critic": 1.0e-3,
               "tau": 0.01, "batch_size": 64, "gradient_steps_per_episode": 20, "reward": "error"},
    },
    "latency": {"batch_size": 1, "threads": 1, "repeats": 30, "device": "cpu", "tolerance": 0.05},
    "name": "fuzz",
}
SECTIONS: list[tuple[str, ...]] = [(), ("groups",), ("evaluation",), ("strategy",), ("strategy", "rl"), ("latency",)]

# path -> (lowest allowed, highest allowed or None); the integer fields.
INTS: dict[tuple[str, ...], tuple[int, int | None]] = {
    ("groups", "round_to"): (1, None),
    ("evaluation", "calibration_batches"): (0, None),
    ("evaluation", "val_samples"): (1, None),
    ("evaluation", "finetune_steps"): (0, None),
    ("strategy", "trials"): (1, None),
    ("strategy", "seed"): (0, 2**32 - 1),
    ("strategy", "rl", "warmup_episodes"): (0, None),
    ("strategy", "rl", "buffer_episodes"): (1, None),
    ("strategy", "rl", "batch_size"): (1, None),
    ("strategy", "rl", "gradient_steps_per_episode"): (1, None),
    ("latency", "batch_size"): (1, None),
    ("latency", "threads"): (1, None),
    ("latency", "repeats"): (1, None),
}
# path -> values out of range; the float fields.
FLOATS: dict[tuple[str, ...], list[float]] = {
    ("strategy", "rl", "noise_sigma"): [0.0, -1.0],
    ("strategy", "rl", "noise_decay"): [0.0, 1.5, -0.2],
    ("strategy", "rl", "learning_rate_actor"): [0.0, -1e-4],
    ("strategy", "rl", "learning_rate_critic"): [0.0, -3.0],
    ("strategy", "rl", "tau"): [0.0, 1.01],
    ("latency", "tolerance"): [-0.01, 1.0, 7.0],
}
CHOICES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("strategy", "name"): STRATEGIES,
    ("strategy", "sampler"): SAMPLERS,
    ("strategy", "objective"): OBJECTIVES,
    ("strategy", "rl", "agent"): AGENTS,
    ("strategy", "rl", "reward"): REWARDS,
    ("latency", "device"): ("cpu", "cuda"),
    ("evaluation", "importance"): IMPORTANCE_NAMES,
}
OPTIONAL = {("evaluation", "val_samples"), ("latency",), ("name",)}  # null is allowed there


def _word(rng: random.Random, lo: int = 5, hi: int = 10) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _copy(data: Any) -> Any:
    return json.loads(json.dumps(data))


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _get(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for p in path:
        node = node[p]
    return node


def _not_a_number(rng: random.Random, path: tuple[str, ...], integer: bool) -> Any:
    values: list[Any] = [True, False, "3", "0.5", "", "abc", [1], [], {"value": 1}, float("nan"), float("inf"),
                         -float("inf")]
    if integer:
        values += [2.5, 0.1]
    if path not in OPTIONAL:
        values.append(None)
    return rng.choice(values)


def _not_a_choice(rng: random.Random, choices: tuple[str, ...]) -> Any:
    value = rng.choice([_word(rng), _word(rng).upper(), 1, 0.5, True, None, [choices[0]], {"name": choices[0]}, ""])
    assert value not in choices
    return value


# Each mutation takes a valid space dict and makes it invalid (in place).
def _unknown_key(rng: random.Random, data: dict[str, Any]) -> None:
    section = rng.choice(SECTIONS)
    node = _get(data, section)
    key = _word(rng)
    while key in node:
        key = _word(rng)
    node[key] = rng.choice([1, "x", True, None, [1, 2], {"a": 1}])


def _int_wrong_type(rng: random.Random, data: dict[str, Any]) -> None:
    path = rng.choice(list(INTS))
    _set(data, path, _not_a_number(rng, path, integer=True))


def _int_out_of_range(rng: random.Random, data: dict[str, Any]) -> None:
    path = rng.choice(list(INTS))
    lo, hi = INTS[path]
    below = lo - rng.choice([1, 2, 10, 10**6])
    _set(data, path, below if hi is None or rng.random() < 0.5 else hi + rng.choice([1, 2**40]))


def _float_wrong_type(rng: random.Random, data: dict[str, Any]) -> None:
    path = rng.choice(list(FLOATS))
    _set(data, path, _not_a_number(rng, path, integer=False))


def _float_out_of_range(rng: random.Random, data: dict[str, Any]) -> None:
    path = rng.choice(list(FLOATS))
    _set(data, path, rng.choice(FLOATS[path]))


def _bad_choice(rng: random.Random, data: dict[str, Any]) -> None:
    path = rng.choice(list(CHOICES))
    _set(data, path, _not_a_choice(rng, CHOICES[path]))


def _bad_string(rng: random.Random, data: dict[str, Any]) -> None:
    path = rng.choice([("task",), ("name",)])
    values: list[Any] = [1, 0.5, True, False, ["digits-cnn"], {"name": "digits-cnn"}]
    _set(data, path, rng.choice(values + ([None] if path not in OPTIONAL else [])))


def _bad_globs(rng: random.Random, data: dict[str, Any]) -> None:
    key = rng.choice(["include", "exclude"])
    data["groups"][key] = rng.choice(["*", "conv*", 1, True, None, {"a": "*"}, ["*", 1], ["*", None], [True],
                                      [["*"]], [{"a": 1}]])


def _bad_ratio(rng: random.Random, data: dict[str, Any]) -> None:
    data["groups"]["ratio"] = rng.choice([
        [0.8, 0.2], [0.0, 1.0], [0.0, 1.5], [-0.1, 0.5], [0.5], [0.1, 0.2, 0.3], [], 0.5, "0.0-0.8",
        [0.0, "0.5"], ["0", 0.5], [True, 0.5], [0.0, None], [0.0, float("nan")], {"low": 0, "high": 0.5},
    ])


def _bad_budget(rng: random.Random, data: dict[str, Any]) -> None:
    metric = rng.choice(["flops", "params", "latency_ms", "latency"])
    data["budget"] = rng.choice([
        {_word(rng): 0.5}, {"macs": 0.5}, {"flops": 0.5, "params": 0.5}, {"params": 0.4, "latency_ms": 3.0}, {},
        {metric: 0}, {metric: -1}, {metric: -0.5}, {metric: "0.5"}, {metric: "half"}, {metric: True},
        {metric: False}, {metric: None}, {metric: [0.5]}, {metric: {"value": 0.5}}, {metric: float("nan")},
        {metric: float("inf")}, {"latency": 1.0}, {"latency": 3.0},
        [{"flops": 0.5}], "flops=0.5", 0.5, True, None,
    ])


def _section_not_a_mapping(rng: random.Random, data: dict[str, Any]) -> None:
    path = rng.choice(SECTIONS[1:])
    values: list[Any] = [[1, 2], "yes please", 3, True, 0.5, []]
    _set(data, path, rng.choice(values + ([None] if path not in OPTIONAL else [])))


def _no_task(rng: random.Random, data: dict[str, Any]) -> None:
    del data["task"]


MUTATIONS: list[Callable[[random.Random, dict[str, Any]], None]] = [
    _unknown_key, _int_wrong_type, _int_out_of_range, _float_wrong_type, _float_out_of_range, _bad_choice,
    _bad_string, _bad_globs, _bad_ratio, _bad_budget, _section_not_a_mapping, _no_task,
]


def _broken_yaml(rng: random.Random) -> str:
    text = yaml.safe_dump(BASE_SPACE, sort_keys=False)
    nested_twice = text.replace("  round_to: 1\n", "  round_to: 1\n  round_to: 2\n")
    assert nested_twice != text
    return rng.choice([
        "task: user_tasks:raises\nbudget: {flops: 0.5\n",
        "task: user_tasks:raises\ngroups:\n  include: [\"*\", \"conv*\"\n  ratio: [0.0, 0.8]\n",
        "task: user_tasks:raises\n  budget: {flops: 0.5}\n",  # bad indentation
        "task: user_tasks:raises\n\tbudget: {flops: 0.5}\n",  # tab indentation
        "task: user_tasks:raises\nstrategy: *missing_anchor\n",
        "task: !!python/object/apply:os.system [\"true\"]\n",
        "task: \"digits-cnn\nbudget: {flops: 0.5}\n",  # unclosed quote
        "task: user_tasks:raises\n---\ntask: user_tasks:raises\n",  # two documents
        "- task: user_tasks:raises\nbudget: {flops: 0.5}\n",
        "task: user_tasks:raises\nbudget: {flops: 0.5}}\n",
        "task: user_tasks:raises\x00\n",
        "task: user_tasks:raises\n? [a, b]\n: 1\n",  # a key that is a list
        text + f"{rng.choice(list(BASE_SPACE))}: 1\n",  # a duplicate top-level key
        nested_twice,  # a duplicate nested key
    ])


def _space_case(rng: random.Random) -> tuple[str, bytes]:
    """(kind, file contents) of a bad space file."""
    roll = rng.random()
    if roll < 0.06:
        return "random bytes", b"\xff" + bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    if roll < 0.09:
        return "empty", rng.choice([b"", b"\n", b"# a comment\n", b"# only\n#comments\n\n", b"~\n", b"null\n"])
    if roll < 0.14:
        top = rng.choice([["digits-cnn"], "digits-cnn", 42, 0.5, True, [{"task": "digits-cnn"}]])
        return "not a mapping", yaml.safe_dump(top).encode()
    if roll < 0.24:
        return "invalid YAML", _broken_yaml(rng).encode()
    data = _copy(BASE_SPACE)
    chosen = rng.sample(MUTATIONS, k=rng.choice([1, 1, 1, 2, 3]))
    for mutate in chosen:
        mutate(rng, data)
    kind = "+".join(m.__name__.strip("_") for m in chosen)
    text = json.dumps(data) if rng.random() < 0.2 else yaml.safe_dump(data, sort_keys=False)  # JSON is YAML too
    return kind, text.encode()


def test_the_base_space_is_valid(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE_SPACE))
    assert load_space(path).strategy.rl.batch_size == 64  # the fuzzed faults are the only ones


def test_fuzzed_space_files_are_refused_through_the_cli(capsys, tmp_path):
    workdir = tmp_path / "home"
    rng = random.Random(0)
    failures, kinds = [], set()
    for i in range(N_SPACES):
        kind, content = _space_case(rng)
        kinds.add(kind.split("+")[0])
        path = tmp_path / f"space-{i:03d}.yaml"
        path.write_bytes(content)
        try:
            code = run(["search", "--space", str(path), "--workdir", str(workdir)])
            captured = capsys.readouterr()
            out = captured.out + captured.err
        except BaseException as exc:  # noqa: BLE001 - any escape is a failure of the case
            capsys.readouterr()
            failures.append(f"#{i} {kind}: raised {type(exc).__name__}: {exc}")
            continue
        if PAST_VALIDATION in out:
            failures.append(f"#{i} {kind}: accepted (the search loaded its task) for {content[:300]!r}")
        elif code != 2 or "error:" not in out or str(path) not in out or "Traceback" in out:
            failures.append(f"#{i} {kind}: exit {code}: {out.strip()[:400]!r} for {content[:300]!r}")
        if (workdir / "optuna.db").exists() or (workdir / "mlflow.db").exists():
            failures.append(f"#{i} {kind}: wrote a study or tracking store")
            break
    assert not failures, f"{len(failures)} of {N_SPACES} bad space files not refused cleanly:\n" + "\n".join(failures[:20])
    assert len(kinds) >= 15, kinds  # the generator covers every kind of fault


# ----- plans -----

def _base_plan(digits_profile) -> dict[str, Any]:
    plan = ap.uniform_plan(digits_profile, ap.Budget(flops=0.5)).with_provenance(study="fuzz", trial=3)
    return plan.to_dict()


def _plan_case(rng: random.Random, base: dict[str, Any]) -> tuple[str, bytes]:
    """(kind, file contents) of a bad plan: every case is invalid for the digits-cnn model."""
    data = _copy(base)
    groups = list(data["channels"])
    group = rng.choice(groups)
    dense, kept = data["channels"][group]
    kind = rng.choice([
        "drop required key", "schema", "unknown key", "fingerprint type", "task type", "input_shape",
        "ratios type", "channels type", "ratio value", "channel value", "budget", "metrics", "provenance",
        "kept contradicts ratio", "ratio contradicts kept", "kept out of range", "unknown group", "missing group",
        "dense differs", "reordered", "wrong fingerprint", "truncated", "not an object", "duplicate key",
        "random bytes",
    ])
    if kind == "drop required key":
        del data[rng.choice(["schema", "model_fingerprint", "ratios", "channels", "input_shape"])]
    elif kind == "schema":
        data["schema"] = rng.choice(["autoprune.plan/2", "autoprune.plan/0", "", None, 1, ["autoprune.plan/1"]])
    elif kind == "unknown key":
        key = rng.choice(["ratio", "chanels", "fingerprint", _word(rng)])
        data[key if key not in base else key + "_"] = rng.choice([1, {}, None, "x"])
    elif kind == "fingerprint type":
        data["model_fingerprint"] = rng.choice([None, 1, True, [data["model_fingerprint"]], {}])
    elif kind == "task type":
        data["task"] = rng.choice([1, True, ["digits-cnn"], {"name": "digits-cnn"}])
    elif kind == "input_shape":
        data["input_shape"] = rng.choice([
            [1, 1, 28, 28], [1, 3, 8, 8], [1, 1, 8], [1, 1, 8, 8, 1], [1, 1, 16, 8], [], [1, 0, 8, 8],
            [1, -1, 8, 8], [1, 1.5, 8, 8], [1, True, 8, 8], [1, "1", 8, 8], "1x1x8x8", 64, None, {"h": 8},
        ])
    elif kind == "ratios type":
        data["ratios"] = rng.choice([None, [0.5] * len(groups), "0.5", 0.5, True])
    elif kind == "channels type":
        data["channels"] = rng.choice([None, [[dense, kept]], "conv1:32", 32, True])
    elif kind == "ratio value":
        data["ratios"][group] = rng.choice([None, True, False, "0.5", [0.5], {"r": 0.5}, float("nan"),
                                            float("inf"), -0.1, 1.0, 1.5])
    elif kind == "channel value":
        data["channels"][group] = rng.choice([None, dense, [dense], [dense, kept, 1], [str(dense), kept],
                                              [dense, True], [dense + 0.5, kept], {"dense": dense, "kept": kept}])
    elif kind == "budget":
        data["budget"] = rng.choice([[0.5], "flops=0.5", 0.5, True, {"flops": True}, {"flops": "0.5"},
                                     {"macs": 0.5}, {"flops": 0.5, "params": 0.5}, {}, {"flops": -1},
                                     {"flops": float("nan")}, {"latency": 2.0}])
    elif kind == "metrics":
        data["metrics"] = rng.choice([[1.0], "fast", 3, True, {"val_score": True}, {"val_score": "0.9"},
                                      {"flops": [1, 2]}, {"flops": {"v": 1}}])
    elif kind == "provenance":
        data["provenance"] = rng.choice([["optuna"], "optuna", 3, True])
    elif kind == "kept contradicts ratio":
        data["channels"][group] = [dense, kept - 1 if kept > 1 else kept + 1]
    elif kind == "ratio contradicts kept":
        data["ratios"][group] = round((data["ratios"][group] + 0.25) % 0.9, 4)
    elif kind == "kept out of range":
        new = rng.choice([0, -1, dense + 1, 2 * dense])
        data["channels"][group] = [dense, new]
        data["ratios"][group] = (dense - new) / dense if 0 <= (dense - new) / dense < 1 else 0.5
    elif kind == "unknown group":
        name = rng.choice(["conv9", "layer1.0.conv1", "fc", "Conv1", _word(rng)])
        data["channels"][name] = [64, 32]
        data["ratios"][name] = 0.5
    elif kind == "missing group":
        for name in rng.sample(groups, rng.randint(1, len(groups))):
            del data["channels"][name], data["ratios"][name]
    elif kind == "dense differs":
        factor = rng.choice([2, 3])
        data["channels"][group] = [dense * factor, kept * factor]  # the same ratio
    elif kind == "reordered":
        order = groups[:]
        while order == groups:
            rng.shuffle(order)
        data["channels"] = {n: data["channels"][n] for n in order}
        data["ratios"] = {n: data["ratios"][n] for n in order}
    elif kind == "wrong fingerprint":
        data["model_fingerprint"] = rng.choice(["", "0" * 64, "".join(rng.choice("0123456789abcdef") for _ in range(64))])
    text = json.dumps(data, indent=rng.choice([None, 2]))
    if kind == "truncated":
        text = text[: rng.randrange(len(text.rstrip()))]
    elif kind == "not an object":
        text = json.dumps(rng.choice([[data], "plan", 1, None, True, []]))
    elif kind == "duplicate key":
        text = text.replace("{", '{"task": "digits-cnn", ', 1)
    elif kind == "random bytes":
        return kind, b"\xff" + bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    return kind, text.encode()


def test_fuzzed_plan_files_are_refused(capsys, tmp_path, workdir, digits_task, digits_profile):
    base = _base_plan(digits_profile)
    groups = [(g.name, g.channels) for g in digits_profile.groups]
    shape = tuple(digits_task.example_input.shape)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(base))
    check_plan_matches(ap.Plan.load(good), groups, what="task 'digits-cnn'", input_shape=shape)  # the base is valid

    rng = random.Random(0)
    failures, kinds, through_cli = [], set(), 0
    for i in range(N_PLANS):
        kind, content = _plan_case(rng, base)
        kinds.add(kind)
        path = tmp_path / f"plan-{i:03d}.json"
        path.write_bytes(content)
        out_file = tmp_path / f"pruned-{i:03d}.pt"
        if i % (N_PLANS // N_PLANS_THROUGH_CLI) == 0:
            through_cli += 1
            try:
                code = run(["apply", "--plan", str(path), "--task", "digits-cnn", "--out", str(out_file),
                            "--workdir", str(workdir)])
                captured = capsys.readouterr()
                out = captured.out + captured.err
            except BaseException as exc:  # noqa: BLE001
                capsys.readouterr()
                failures.append(f"#{i} {kind} (cli): raised {type(exc).__name__}: {exc}")
                continue
            if code != 2 or "error:" not in out or "Traceback" in out:
                failures.append(f"#{i} {kind} (cli): exit {code}: {out.strip()[:400]!r}")
        else:
            try:
                plan = ap.Plan.load(path)
                check_plan_matches(plan, groups, what="task 'digits-cnn'", input_shape=shape)
            except AutopruneError:
                pass
            except BaseException as exc:  # noqa: BLE001
                failures.append(f"#{i} {kind}: raised {type(exc).__name__}: {exc}")
            else:
                failures.append(f"#{i} {kind}: accepted {content[:300]!r}")
        if out_file.exists():
            failures.append(f"#{i} {kind}: wrote {out_file}")
    assert not failures, f"{len(failures)} of {N_PLANS} bad plans not refused cleanly:\n" + "\n".join(failures[:20])
    assert through_cli >= N_PLANS_THROUGH_CLI and len(kinds) >= 20, (through_cli, kinds)


def test_fuzz_generators_are_reproducible():
    from autoprune.task import dense_model

    base = _base_plan(ap.profile_model(*dense_model("digits-cnn", pretrained=False)))

    def draws(make: Callable[[random.Random], tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        rng = random.Random(0)
        return [make(rng) for _ in range(20)]

    assert draws(lambda rng: _plan_case(rng, base)) == draws(lambda rng: _plan_case(rng, base))
    assert draws(_space_case) == draws(_space_case)
