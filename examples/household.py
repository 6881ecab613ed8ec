"""A tiny ALFWorld-like household: multi-step, partially observed pick-and-place tasks as chat turns.

Why this environment: empg's sample needs a policy whose entropy *means* something. Here some steps
are obvious (the mug is in sight: take it; it is in hand: carry it to the target) and some are real
choices under partial observation (which closed cabinet hides the mug?). Objects sit where their kind
usually lives (mugs in cabinets, apples in the fridge, ...) with some probability, so a good agent
searches likely receptacles first and a trained policy is confident on the obvious steps and unsure
on the search steps.

Every task takes place in the same kitchen; what varies is the object, where it is hidden and the
target. Everything is a pure function of a seed: `Task.from_seed(s)` builds the same task every time,
and `Household` is deterministic given the actions. The expert (`expert_reply`) searches the way a
careful human would, sampling the next receptacle by the prior over unvisited ones, and slips
now and then, so behaviour cloning on its demonstrations gives a plausible but imperfect agent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# The one kitchen every task takes place in: kind -> (instances, needs opening before its contents show).
RECEPTACLE_KINDS: dict[str, tuple[int, bool]] = {
    "cabinet": (2, True), "drawer": (2, True), "fridge": (1, True), "microwave": (1, True),
    "countertop": (2, False), "shelf": (1, False), "diningtable": (1, False), "sinkbasin": (1, False),
}
RECEPTACLES: tuple[str, ...] = tuple(f"{k} {i}" for k, (n, _) in RECEPTACLE_KINDS.items() for i in range(1, n + 1))

# object -> where it usually is: P(kind). The expert searches by this prior; the policy must learn it.
OBJECT_PRIORS: dict[str, dict[str, float]] = {
    "mug": {"cabinet": 0.6, "countertop": 0.25, "sinkbasin": 0.15},
    "apple": {"fridge": 0.55, "countertop": 0.25, "diningtable": 0.2},
    "key": {"drawer": 0.6, "shelf": 0.3, "diningtable": 0.1},
    "book": {"shelf": 0.6, "diningtable": 0.25, "drawer": 0.15},
    "knife": {"drawer": 0.5, "countertop": 0.35, "sinkbasin": 0.15},
    "egg": {"fridge": 0.7, "microwave": 0.15, "countertop": 0.15},
    "plate": {"cabinet": 0.55, "diningtable": 0.3, "sinkbasin": 0.15},
}

SEARCH_OPENERS = ("", "hmm, ", "next, ", "ok, ")
SEARCH_THOUGHTS = ("the {obj} may be in {where}", "a {obj} is often in a {kind}", "I will look in {where}",
                   "maybe {where} has the {obj}", "let me search {where}", "{where} is worth a look")
"""How the expert phrases a search step: free wording is part of what makes search steps uncertain."""

MAX_STEPS = 12
"""Step budget of one episode; an episode that has not put the object in place by then fails."""

NOTHING = "Nothing happens."
ACTION = re.compile(r"Action: (.*)$")


def kind_of(receptacle: str) -> str:
    """'cabinet 2' -> 'cabinet'."""
    return receptacle.rsplit(" ", 1)[0]


def _contents(objects: list[str]) -> str:
    return "You see " + ", ".join(f"a {o}" for o in objects) + "." if objects else "You see nothing."


@dataclass(frozen=True)
class Task:
    """One goal in the kitchen, put `obj` in `target`, and where the object is hidden (`home`)."""

    seed: int
    obj: str
    home: str
    target: str

    @property
    def task_id(self) -> str:
        return f"task-{self.seed:05d}"

    @property
    def goal(self) -> str:
        return f"put a {self.obj} in {self.target}"

    @classmethod
    def from_seed(cls, seed: int) -> "Task":
        """An object, its home drawn from the object's prior (kind, then a uniform instance), a target elsewhere."""
        rng = np.random.default_rng(seed)
        obj = str(rng.choice(sorted(OBJECT_PRIORS)))
        kinds, probs = zip(*OBJECT_PRIORS[obj].items())
        home_kind = str(rng.choice(kinds, p=probs))
        home = str(rng.choice([r for r in RECEPTACLES if kind_of(r) == home_kind]))
        target = str(rng.choice([r for r in RECEPTACLES if r != home]))
        return cls(seed, obj, home, target)


class Household:
    """The environment state of one episode: where the agent is, what is open, what it holds."""

    def __init__(self, task: Task):
        self.task = task
        self.contents: dict[str, list[str]] = {r: [task.obj] if r == task.home else [] for r in RECEPTACLES}
        self.opened: set[str] = set()
        self.at: str | None = None
        self.holding: str | None = None
        self.steps = 0
        self.success = False

    @property
    def done(self) -> bool:
        return self.success or self.steps >= MAX_STEPS

    def first_observation(self) -> str:
        return f"You are in the kitchen. Your task: {self.task.goal}."

    def _visible(self, receptacle: str) -> bool:
        return not RECEPTACLE_KINDS[kind_of(receptacle)][1] or receptacle in self.opened

    def step(self, reply: str) -> str:
        """Apply the action on the reply's last `Action: ...` line and return the observation."""
        self.steps += 1
        match = ACTION.search(reply.strip())
        return self._act(match.group(1).strip() if match else "")

    def _act(self, action: str) -> str:
        t = self.task
        if action.startswith("go to ") and action[6:] in self.contents:
            self.at = action[6:]
            if self._visible(self.at):
                return f"You arrive at {self.at}. {_contents(self.contents[self.at])}"
            return f"You arrive at {self.at}. It is closed."
        if action == f"open {self.at}" and not self._visible(self.at):
            self.opened.add(self.at)
            return f"You open {self.at}. {_contents(self.contents[self.at])}"
        if (self.holding is None and self.at and self._visible(self.at)
                and (m := re.fullmatch(r"take (\w+) from (.+)", action)) and m.group(2) == self.at
                and m.group(1) in self.contents[self.at]):
            self.contents[self.at].remove(m.group(1))
            self.holding = m.group(1)
            return f"You pick up the {self.holding}. Your task: {t.goal}."
        if (self.holding and self.at and self._visible(self.at)
                and action == f"put {self.holding} in {self.at}"):
            self.contents[self.at].append(self.holding)
            self.success = self.holding == t.obj and self.at == t.target
            self.holding, obj = None, self.holding
            return f"You put the {obj} in {self.at}."
        return NOTHING


def expert_reply(env: Household, searched: set[str], rng: np.random.Generator, slip: float) -> str:
    """A noisy expert's "Thought: ... Action: ..." for the current state (it sees only what the agent saw).

    With probability `slip` it goes to a random receptacle instead. A search step picks a receptacle
    whose contents it has not seen yet with probability prior(kind) / instances(kind) (a small floor
    for unlikely kinds) and phrases the thought in one of several ways: the real choices of this task.
    """
    t, obj = env.task, env.task.obj
    if rng.random() < slip:
        where = str(rng.choice(RECEPTACLES))
        return f"Thought: let me check {where}. Action: go to {where}"
    if env.holding == obj:
        if env.at != t.target:
            return f"Thought: now I bring the {obj} to {t.target}. Action: go to {t.target}"
        if not env._visible(t.target):
            return f"Thought: {t.target} is closed. Action: open {t.target}"
        return f"Thought: I put the {obj} in {t.target}. Action: put {obj} in {t.target}"
    if env.at and env._visible(env.at) and obj in env.contents[env.at]:
        return f"Thought: I found the {obj}. Action: take {obj} from {env.at}"
    if env.at and not env._visible(env.at):
        return f"Thought: {env.at} is closed. Action: open {env.at}"
    unvisited = [r for r in RECEPTACLES if r not in searched] or list(RECEPTACLES)
    prior = OBJECT_PRIORS[obj]
    weights = np.array([prior.get(kind_of(r), 0.02) / RECEPTACLE_KINDS[kind_of(r)][0] for r in unvisited])
    where = unvisited[int(rng.choice(len(unvisited), p=weights / weights.sum()))]
    opener = SEARCH_OPENERS[int(rng.integers(len(SEARCH_OPENERS)))]
    thought = SEARCH_THOUGHTS[int(rng.integers(len(SEARCH_THOUGHTS)))].format(obj=obj, where=where,
                                                                           kind=kind_of(where))
    thought = opener + thought
    return f"Thought: {thought}. Action: go to {where}"


def expert_episode(task: Task, rng: np.random.Generator, slip: float) -> tuple[list[dict[str, str]], bool]:
    """One demonstration as chat messages (user observations, assistant replies) and its outcome."""
    env = Household(task)
    messages = [{"role": "user", "content": env.first_observation()}]
    searched: set[str] = set()
    while not env.done:
        reply = expert_reply(env, searched, rng, slip)
        observation = env.step(reply)
        if env.at and env._visible(env.at):
            searched.add(env.at)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": observation}]
    return messages[:-1], env.success  # the last observation prompts nothing
