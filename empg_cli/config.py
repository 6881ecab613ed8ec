"""Typed configuration of `empg score` and `empg advantages`; stored whole in the output's metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from .errors import BadUsage

Estimator = Literal["grpo", "drgrpo", "rloo", "reinforce", "column"]
RewardAgg = Literal["equal", "sum"]
EmpgNorm = Literal["mean", "meanstd"]
EntropySource = Literal["model", "logged"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Truncation = Literal["none", "left"]
ESTIMATORS, REWARD_AGGS, EMPG_NORMS = get_args(Estimator), get_args(RewardAgg), get_args(EmpgNorm)
ENTROPY_SOURCES, DEVICES, DTYPES, TRUNCATIONS = get_args(EntropySource), get_args(Device), get_args(Dtype), \
    get_args(Truncation)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BadUsage(f"{name} must be one of {', '.join(choices)}; got '{value}'")


@dataclass(frozen=True)
class AdvantageConfig:
    """Hyperparameters of the base advantage, EMPG and AEM (docs/method.md)."""

    estimator: str = "grpo"
    """Base advantage A_i: grpo, drgrpo, rloo, reinforce, or column (the input's `advantage`)."""
    reward_agg: str = "equal"
    """How a trajectory's non-null step rewards become R_i: `equal` (must all be equal) or `sum`."""
    k: float = 1.0
    """EMPG self-calibrating scaling strength: g = exp(-k H_norm) / mean_B exp(-k H_norm)."""
    k_future: float = 1.0
    """EMPG future-clarity strength k': f_next = exp(-k' H_norm(t+1))."""
    zeta: float = 0.1
    """EMPG future-clarity bonus weight zeta in A_mod = A_i g + zeta f_next."""
    empg_norm: str = "mean"
    """EMPG batch normalisation: `mean` (A_mod - mean_B) or `meanstd` (also divide by std_B)."""
    aem_tau: float = 1.0
    """AEM temperature tau in w = exp(-u_norm / tau) / mean_G exp(-u_norm / tau)."""
    aem_min_range: float = 0.1
    """AEM flat-group threshold delta (nats): a group whose entropies span less than delta keeps w = 1."""
    batch_key: tuple[str, ...] = ("run", "iteration")
    """Columns whose values define a batch B, EMPG's normalisation scope (one policy update)."""

    def __post_init__(self) -> None:
        _check_choice("--estimator", self.estimator, ESTIMATORS)
        _check_choice("--reward-agg", self.reward_agg, REWARD_AGGS)
        _check_choice("--empg-norm", self.empg_norm, EMPG_NORMS)
        for flag, value in (("--k", self.k), ("--k-future", self.k_future), ("--zeta", self.zeta)):
            if not value >= 0:  # also rejects NaN
                raise BadUsage(f"{flag} must be >= 0; got {value}")
        if not self.aem_min_range >= 0:
            raise BadUsage(f"--aem-min-range must be >= 0; got {self.aem_min_range}")
        if not self.aem_tau > 0:
            raise BadUsage(f"--aem-tau must be > 0; got {self.aem_tau}")
        if not self.batch_key:
            raise BadUsage("--batch-key needs at least one column")


@dataclass(frozen=True)
class ScoreConfig:
    """How `empg score` obtains per-token entropies."""

    model: str | None = None
    """Local directory, hub id, or template with `{iteration}`; None: the model named in the input's metadata."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda or mps."""
    dtype: str = "auto"
    """Model weights' dtype: auto (bfloat16 on cuda, float32 elsewhere), float32, bfloat16, float16."""
    temperature: float | None = None
    """Sampling temperature T: entropies are of softmax(z / T). None: the input metadata's `temperature`, else 1.0."""
    entropy_source: str = "model"
    """`model`: rescore with the policy; `logged`: mean of the input's `token_entropy`."""
    batch_tokens: int = 8192
    """Token budget of one forward batch, padding included."""
    token_level: bool = False
    """Also write per-token lists (token_entropy, token_logprob, token_adv_empg, token_adv_aem)."""
    truncate_prompt: str = "none"
    """`none`: a sequence longer than the model's context is an error; `left`: drop the prompt's oldest tokens."""
    prefix_sharing: bool = True
    """Score a trajectory whose steps form a token-exact prefix chain in one forward pass."""
    allow_pickle: bool = False
    """Allow non-safetensors (pickle) weights."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint."""

    def __post_init__(self) -> None:
        _check_choice("--device", self.device, DEVICES)
        _check_choice("--dtype", self.dtype, DTYPES)
        _check_choice("--entropy-source", self.entropy_source, ENTROPY_SOURCES)
        _check_choice("--truncate-prompt", self.truncate_prompt, TRUNCATIONS)
        if self.temperature is not None and not self.temperature > 0:
            raise BadUsage(f"--temperature must be > 0; got {self.temperature}")
        if self.batch_tokens < 1:
            raise BadUsage(f"--batch-tokens must be >= 1; got {self.batch_tokens}")


Engine = Literal["local", "ray"]
ENGINES = get_args(Engine)


@dataclass(frozen=True)
class RunConfig:
    """Where `empg score` rescores and whether it resumes; none of it changes the results."""

    engine: str = "local"
    """`local`: this process, chunk after chunk; `ray`: a Ray Data actor pool, one policy per actor."""
    workers: int | None = None
    """Ray actors; None: one per GPU of the cluster, else 1."""
    ray_address: str | None = None
    """The Ray cluster to attach to; None: the one named by RAY_ADDRESS, else a local one started for the run."""
    resume: bool = True
    """Continue from the results a killed run with the same input and settings committed to the work folder."""
    chunk_tokens: int | None = None
    """Tokens per committed chunk; None: sized to about 10 s of compute."""

    def __post_init__(self) -> None:
        _check_choice("--engine", self.engine, ENGINES)
        if self.workers is not None and self.workers < 1:
            raise BadUsage(f"--workers must be >= 1; got {self.workers}")
        if self.engine != "ray" and (self.workers is not None or self.ray_address is not None):
            raise BadUsage("--workers and --ray-address need --engine ray")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise BadUsage(f"chunk_tokens must be >= 1; got {self.chunk_tokens}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def advantage_config_from(stored: dict[str, Any] | None, **overrides: Any) -> AdvantageConfig:
    """An AdvantageConfig from stored metadata values, with the flags the user gave (not None) on top."""
    names = {f.name for f in fields(AdvantageConfig)}
    values = {k: v for k, v in (stored or {}).items() if k in names}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "batch_key" in values:
        values["batch_key"] = tuple(values["batch_key"])
    return AdvantageConfig(**values)


EPS_STD = 1e-6
"""Added to a standard deviation before dividing (GRPO's (R - m) / (s + 1e-6); docs/method.md)."""
EPS_RANGE = 1e-8
"""Added to a min-max range before dividing (EMPG's H_norm); AEM's group is flat within it even at delta = 0."""
