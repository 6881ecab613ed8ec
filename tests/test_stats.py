"""empg_cli.stats against the float64 loop references of tests/reference.py (docs/method.md, EMPG Proposition 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from empg_cli.stats import Head, TokenStats, logit_buffers, token_stats_from_hidden, token_stats_from_logits

try:
    from . import reference as ref
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import reference as ref

FIELDS = ("entropy", "sum_p2", "logprob", "renyi2", "grad_norm_sq", "grad_norm_sq_expected")
FLOAT32_EPS = 2.0 ** -23
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def all_fields(stats: TokenStats) -> dict[str, torch.Tensor]:
    """The three stored statistics and the three derived properties, by name."""
    return {name: getattr(stats, name) for name in FIELDS}


def tolerance(logits: torch.Tensor, temperature: float) -> float:
    """Absolute error budget of a float32 computation on z = logits / T.

    The rounding error of float32 reductions over z grows with |z| (not with the vocabulary), so the
    budget is a fixed number of float32 ulps of max |z|; the largest ratio measured was ~63 ulps.
    """
    z_max = float((logits.double() / temperature).abs().max()) if logits.numel() else 0.0
    return 128 * FLOAT32_EPS * (1.0 + z_max)


def max_errors(stats: TokenStats, logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict[str, float]:
    """Largest absolute error of each statistic against the float64 reference on the same (rounded) inputs."""
    want = ref.token_stats_ref(logits.double().numpy(), targets.numpy(), temperature)
    return {name: float(np.max(np.abs(got.double().numpy() - np.asarray(want[name]))))
            for name, got in all_fields(stats).items()}


def make_logits(kind: str, n: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, vocab) float64, targets (n,)) for a named shape of distribution."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=gen, dtype=torch.float64)               # (n, V)
    targets = torch.randint(vocab, (n,), generator=gen)                          # (n,)
    if kind == "spread":
        x = 3.0 * x
    elif kind == "lm_scale":            # magnitudes of real LM heads: a few tens
        x = 8.0 * x + 5.0
    elif kind == "peaked":              # one dominant token per row; targets hit it half the time
        top = torch.randint(vocab, (n,), generator=gen)
        x[torch.arange(n), top] += 40.0
        targets = torch.where(torch.arange(n) % 2 == 0, top, targets)
    elif kind == "near_uniform":
        x = 1e-4 * x
    elif kind == "offset":              # softmax is shift invariant; a large common offset must not matter
        x = 2.0 * x + 100.0
    else:
        raise ValueError(kind)
    return x, targets


@pytest.mark.parametrize("temperature", [0.6, 1.7])
@pytest.mark.parametrize("vocab", [2, 17, 257, 5000])
@pytest.mark.parametrize("kind", ["spread", "lm_scale", "peaked", "near_uniform", "offset"])
def test_token_stats_match_float64_reference(kind: str, vocab: int, temperature: float) -> None:
    logits64, targets = make_logits(kind, 6, vocab, seed=vocab)
    for dtype in INPUT_DTYPES:
        logits = logits64.to(dtype)
        stats = token_stats_from_logits(logits, targets, temperature)
        for name, got in all_fields(stats).items():
            assert got.dtype == torch.float32, f"{name} from {dtype} logits is {got.dtype}, docs/method.md wants float32"
            assert got.shape == (6,), name
        errors = max_errors(stats, logits, targets, temperature)
        budget = tolerance(logits, temperature)
        bad = {name: err for name, err in errors.items() if not err <= budget}
        assert not bad, f"{dtype}: errors {bad} exceed {budget:.2e}"


@settings(max_examples=80, deadline=None)
@given(logits=st.integers(1, 40).flatmap(lambda v: st.lists(
           st.lists(st.floats(-60, 60, allow_nan=False, allow_subnormal=False), min_size=v, max_size=v),
           min_size=1, max_size=4)),
       temperature=st.floats(0.25, 4.0),
       data=st.data())
def test_token_stats_match_reference_on_arbitrary_rows(logits: list[list[float]], temperature: float,
                                                       data: st.DataObject) -> None:
    x = torch.tensor(logits, dtype=torch.float32)                                # (N, V)
    targets = torch.tensor(data.draw(st.lists(st.integers(0, x.shape[1] - 1), min_size=x.shape[0],
                                              max_size=x.shape[0])))
    errors = max_errors(token_stats_from_logits(x, targets, temperature), x, targets, temperature)
    budget = tolerance(x, temperature)
    assert all(err <= budget for err in errors.values()), (errors, budget)


def test_single_token_vocabulary_is_certain() -> None:
    stats = token_stats_from_logits(torch.tensor([[3.5], [-7.0]]), torch.tensor([0, 0]), temperature=0.7)
    for name, want in (("entropy", 0.0), ("sum_p2", 1.0), ("logprob", 0.0), ("renyi2", 0.0),
                       ("grad_norm_sq", 0.0), ("grad_norm_sq_expected", 0.0)):
        torch.testing.assert_close(getattr(stats, name), torch.full((2,), want), atol=1e-6, rtol=0, msg=name)


def test_uniform_distribution_has_closed_form_values() -> None:
    vocab = 1000
    stats = token_stats_from_logits(torch.full((3, vocab), 2.5), torch.tensor([0, 5, 999]), temperature=1.3)
    torch.testing.assert_close(stats.entropy, torch.full((3,), math.log(vocab)), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.sum_p2, torch.full((3,), 1.0 / vocab), atol=0, rtol=1e-5)
    torch.testing.assert_close(stats.logprob, torch.full((3,), -math.log(vocab)), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.grad_norm_sq, torch.full((3,), 1.0 - 1.0 / vocab), atol=1e-6, rtol=0)


def test_temperature_is_applied_to_logits() -> None:
    """softmax(z / T), docs/method.md: T = 2 on logits 2z is T = 1 on z."""
    x, targets = make_logits("spread", 5, 50, seed=1)
    at_t1 = all_fields(token_stats_from_logits(x.float(), targets, 1.0))
    at_t2 = all_fields(token_stats_from_logits((2.0 * x).float(), targets, 2.0))
    for name in FIELDS:
        torch.testing.assert_close(at_t2[name], at_t1[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("seed", range(4))
def test_two_gradient_references_agree(seed: int) -> None:
    """The explicit vector onehot(a) - p and float64 autograd give the same ||grad||^2 (checks the reference)."""
    x, targets = make_logits("spread", 4, 30, seed=seed)
    for row, a in zip(x.numpy(), targets.tolist()):
        explicit = ref.grad_norm_sq_explicit_ref(row, a, 0.8)
        autograd = ref.grad_norm_sq_autograd_ref(row, a, 0.8)
        p, _ = ref.softmax_row(row, 0.8)
        closed_form = 1.0 - 2.0 * p[a] + float(np.sum(p * p))                    # docs/method.md
        assert abs(explicit - autograd) < 1e-12
        assert abs(explicit - closed_form) < 1e-12


@pytest.mark.parametrize("kind", ["spread", "peaked", "near_uniform"])
def test_gradient_norm_matches_autograd(kind: str) -> None:
    x, targets = make_logits(kind, 5, 64, seed=3)
    stats = token_stats_from_logits(x.float(), targets, 0.9)
    want = [ref.grad_norm_sq_autograd_ref(row, a, 0.9) for row, a in zip(x.float().double().numpy(), targets.tolist())]
    np.testing.assert_allclose(stats.grad_norm_sq.double().numpy(), want, atol=tolerance(x, 0.9), rtol=0)


@pytest.mark.parametrize("kind", ["spread", "lm_scale", "peaked", "near_uniform"])
def test_proposition_1_identity_exact_in_float64(kind: str) -> None:
    """sum_a p_a (1 - 2 p_a + C) = 1 - C, and the same with the explicit gradient vector, in float64."""
    x, _ = make_logits(kind, 3, 200, seed=7)
    for row in x.numpy():
        p, _ = ref.softmax_row(row, 1.4)
        c = math.fsum(float(v) ** 2 for v in p)
        closed = math.fsum(float(pa) * (1.0 - 2.0 * float(pa) + c) for pa in p)
        assert abs(closed - (1.0 - c)) < 1e-13
        assert abs(ref.grad_norm_sq_expected_ref(row, 1.4) - (1.0 - c)) < 1e-12


@pytest.mark.parametrize("kind", ["spread", "peaked", "near_uniform"])
def test_proposition_1_holds_for_library_values(kind: str) -> None:
    """Weighting the library's ||grad||^2 of every token a by p_a gives its own 1 - C (float32 budget)."""
    x, _ = make_logits(kind, 1, 300, seed=11)
    vocab = x.shape[1]
    stats = token_stats_from_logits(x.expand(vocab, vocab).float(), torch.arange(vocab), 0.7)  # every a once
    p = torch.exp(stats.logprob.double())                                        # (V,)
    expectation = float((p * stats.grad_norm_sq.double()).sum())
    assert abs(float(p.sum()) - 1.0) < 1e-5
    assert abs(expectation - float(stats.grad_norm_sq_expected[0])) < 1e-5
    assert abs(expectation - (1.0 - math.exp(-float(stats.renyi2[0])))) < 1e-5   # docs/method.md: 1 - exp(-H2)


def test_proposition_1_monte_carlo() -> None:
    """The mean of ||grad||^2 over many sampled a ~ p approaches 1 - sum p^2."""
    x, _ = make_logits("spread", 1, 120, seed=5)
    p, _ = ref.softmax_row(x[0].numpy(), 1.2)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    samples = torch.multinomial(torch.tensor(p), n, replacement=True, generator=gen)  # (n,)
    stats = token_stats_from_logits(x.float().expand(n, -1), samples, 1.2)
    values = stats.grad_norm_sq.double()
    std_err = float(values.std()) / math.sqrt(n)
    want = 1.0 - float(np.sum(p * p))
    assert abs(float(values.mean()) - want) < 5 * std_err + 1e-6, (float(values.mean()), want, std_err)


def test_derived_properties_are_consistent() -> None:
    x, targets = make_logits("lm_scale", 8, 100, seed=2)
    stats = token_stats_from_logits(x.float(), targets, 1.0)
    torch.testing.assert_close(stats.renyi2, -torch.log(stats.sum_p2))
    torch.testing.assert_close(stats.grad_norm_sq_expected, 1.0 - torch.exp(-stats.renyi2), atol=1e-6, rtol=0)
    assert bool((stats.entropy >= 0).all())
    assert bool((stats.renyi2 <= stats.entropy + 1e-5).all()), "Renyi-2 never exceeds Shannon entropy"
    assert bool((stats.entropy <= math.log(100) + 1e-5).all())


# --- chunked application of the LM head -------------------------------------------------------

def linear_head(d: int, vocab: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    head = torch.nn.Linear(d, vocab, bias=True).to(dtype)
    with torch.no_grad():
        head.weight.mul_(4.0)           # logits of a few units, a realistic spread
    return head


def writing(linear: torch.nn.Module) -> Head:
    """The stats.Head of a plain layer: its logits, copied into `out` when given."""
    return lambda hidden, out=None: linear(hidden) if out is None else out.copy_(linear(hidden))


def chunk_elements_for(label: str, n: int, vocab: int) -> int:
    return {"1": 1, "7": 7, "7 rows": 7 * vocab, "one short of all": n * vocab - 1, "big": 1 << 30}[label]


CHUNKS = ["1", "7", "7 rows", "one short of all", "big"]


def exact_head(n: int, d: int, vocab: int, seed: int) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """(head, hidden (N, d), targets (N,)) with small integer weights and inputs: every logit is an integer of at
    most 96 in magnitude, exact in float32 and bfloat16 whatever rows and kernel a matmul sees."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randint(-3, 4, (vocab, d), generator=gen).float())
    return head, torch.randint(-2, 3, (n, d), generator=gen).float(), torch.randint(vocab, (n,), generator=gen)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.55])
def test_chunked_is_bit_identical_when_the_head_is_exact(chunk: str, temperature: float) -> None:
    """With exact logits (whatever rows BLAS sees) chunking must change nothing."""
    n, d, vocab = 23, 16, 97
    head, hidden, targets = exact_head(n, d, vocab, seed=1)
    with torch.no_grad():
        whole = token_stats_from_logits(head(hidden), targets, temperature)
        chunked = token_stats_from_hidden(hidden, writing(head), targets, temperature,
                                          chunk_elements=chunk_elements_for(chunk, n, vocab))
    for name in FIELDS:
        got, want = getattr(chunked, name), getattr(whole, name)
        assert got.shape == (n,) and got.dtype == torch.float32, name
        assert torch.equal(got, want), f"{name}: largest difference {float((got - want).abs().max()):.3e}"


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_equals_unchunked_with_a_random_head(chunk: str) -> None:
    """A random float head: BLAS may round logits differently per row count, so equal to the float32 budget."""
    n, d, vocab = 23, 16, 97
    head = linear_head(d, vocab)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, d, generator=gen)                                    # (N, d)
    targets = torch.randint(vocab, (n,), generator=gen)
    with torch.no_grad():
        logits = head(hidden)
        whole = token_stats_from_logits(logits, targets, 0.55)
        chunked = token_stats_from_hidden(hidden, writing(head), targets, 0.55,
                                          chunk_elements=chunk_elements_for(chunk, n, vocab))
    for name in FIELDS:
        got, want = getattr(chunked, name), getattr(whole, name)
        assert got.shape == (n,) and got.dtype == torch.float32, name
        err = float((got - want).abs().max())
        assert err <= tolerance(logits, 0.55), f"{name}: {err:.3e}"


@pytest.mark.parametrize("given", [False, True])
def test_every_chunk_is_written_into_the_same_buffer(given: bool) -> None:
    """No (rows, V) tensor is allocated per chunk: the head writes each chunk's logits into one buffer, the caller's
    when it passes logit_buffers (whose rows then set the chunk size), and the statistics do not change."""
    n, d, vocab = 23, 8, 50
    linear = linear_head(d, vocab)
    seen = []

    def head(hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is not None:
            seen.append(out.untyped_storage().data_ptr())
        return writing(linear)(hidden, out)

    hidden = torch.randn(n, d, generator=torch.Generator().manual_seed(8))
    targets = torch.randint(vocab, (n,), generator=torch.Generator().manual_seed(9))
    buffers = logit_buffers(n, vocab, hidden.device, chunk_elements=5 * vocab) if given else None
    with torch.no_grad():
        stats = token_stats_from_hidden(hidden, head, targets, 0.9, chunk_elements=n * vocab if given else 5 * vocab,
                                        buffers=buffers)
        whole = token_stats_from_logits(linear(hidden), targets, 0.9)
    assert len(seen) == 5 and len(set(seen)) == 1, seen
    if given:
        assert seen[0] == buffers.untyped_storage().data_ptr()
    for name in FIELDS:
        torch.testing.assert_close(getattr(stats, name), getattr(whole, name), rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 30])
def test_chunked_matches_float64_reference(chunk_elements: int) -> None:
    n, d, vocab = 11, 8, 50
    head = linear_head(d, vocab, seed=3)
    hidden = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
    targets = torch.randint(vocab, (n,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stats = token_stats_from_hidden(hidden, writing(head), targets, 0.8, chunk_elements=chunk_elements)
        logits64 = hidden.double() @ head.weight.double().T + head.bias.double()   # (N, V)
    errors = max_errors(stats, logits64, targets, 0.8)
    assert all(err <= tolerance(logits64, 0.8) for err in errors.values()), errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 30])
def test_chunked_half_precision_head(dtype: torch.dtype, chunk_elements: int) -> None:
    n, d, vocab = 9, 16, 40
    head = linear_head(d, vocab, dtype=dtype, seed=4)
    hidden = torch.randn(n, d, generator=torch.Generator().manual_seed(5)).to(dtype)
    targets = torch.randint(vocab, (n,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = head(hidden)                                                    # (N, V) in dtype
        stats = token_stats_from_hidden(hidden, writing(head), targets, 1.3, chunk_elements=chunk_elements)
    for name, got in all_fields(stats).items():
        assert got.dtype == torch.float32, name
    errors = max_errors(stats, logits, targets, 1.3)
    assert all(err <= tolerance(logits, 1.3) for err in errors.values()), errors


def test_empty_input() -> None:
    logits_stats = token_stats_from_logits(torch.zeros(0, 11, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.long), 0.7)
    hidden_stats = token_stats_from_hidden(torch.zeros(0, 4, dtype=torch.bfloat16),
                                           writing(linear_head(4, 11, dtype=torch.bfloat16)),
                                           torch.zeros(0, dtype=torch.long), 0.7, chunk_elements=7)
    for stats in (logits_stats, hidden_stats):
        for name, got in all_fields(stats).items():
            assert got.shape == (0,) and got.dtype == torch.float32, (name, got.shape, got.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_chunks_on_device_match_float64_reference_at_a_152k_vocabulary(device: str, dtype: torch.dtype) -> None:
    """The device path (cuda kernels where a GPU is present) against float64, on exact logits in both dtypes."""
    n, d, vocab = 6, 16, 151_936
    head, hidden, targets = exact_head(n, d, vocab, seed=7)
    with torch.no_grad():
        logits = hidden.double() @ head.weight.double().T                        # (N, V) exact integers
        stats = token_stats_from_hidden(hidden.to(device, dtype), writing(head.to(device, dtype)), targets.to(device),
                                        0.7,
                                        chunk_elements=2 * vocab + 1)
    assert all(t.device.type == device and t.dtype == torch.float32 for t in stats)
    errors = max_errors(TokenStats(*(t.cpu() for t in stats)), logits, targets, 0.7)
    assert all(err <= tolerance(logits, 0.7) for err in errors.values()), errors


def test_cuda_peak_memory_is_bounded_by_the_chunk_not_by_positions_x_vocabulary(device: str) -> None:
    """4,096 positions x 152k vocabulary are 2.3 GiB of float32 logits; the chunked path must stay near its chunk."""
    if device != "cuda":
        pytest.skip("the allocator's peak is measured on cuda (the CPU bound is bench/run.py's peak RSS case)")
    n, d, vocab, chunk = 4096, 64, 151_936, 1 << 25
    head = linear_head(d, vocab, dtype=torch.bfloat16).cuda()
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(vocab, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        token_stats_from_hidden(hidden, writing(head), targets, 1.0, chunk_elements=chunk)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    full_logits = n * vocab * 4
    assert extra <= 4 * chunk * 4 + 16 * n * 4, (extra / 2 ** 20, full_logits / 2 ** 20)
