"""Shared by the robustness tests: hypothesis budgets, counters, and the "acceptable outcome" checks.

The only acceptable outcomes of feeding instructkit bad input are a correct result or an
`InstructkitError` whose message names the culprit (file, line, field, template id, key). `expect_clean`
turns anything else into a test failure that says which input broke which target.

Counters (inputs tried per target, payloads blocked, kill/resume trials) live in this module; the session
fixture in conftest.py writes them to JSON when INSTRUCTKIT_ROBUSTNESS_REPORT names a file
(benchmarks/bench_robustness.py sets it).

Budgets: `@fuzz_test(default=N, slow=M, x=strategy, ...)` makes two cases of a property test: "default"
runs N examples (CI; derandomized so a failure reproduces), "slow" (marked slow, run by `-m slow`) runs M
under the slow profile. HYPOTHESIS_PROFILE=slow makes the default case use the slow profile too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
SRC = TESTS.parent / "src"
for _path in (str(TESTS), str(SRC)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from instructkit.errors import InstructkitError  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Hypothesis profiles
# --------------------------------------------------------------------------------------------------

DEFAULT_PROFILE = "instructkit-robust"
SLOW_PROFILE = "instructkit-robust-slow"
_COMMON = dict(
    deadline=None,  # the machine is shared: wall time per example is not a property of the code
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile(DEFAULT_PROFILE, derandomize=True, database=None, **_COMMON)
settings.register_profile(SLOW_PROFILE, derandomize=False, **_COMMON)


def slow_profile_selected() -> bool:
    return os.environ.get("HYPOTHESIS_PROFILE", "").lower() in {"slow", SLOW_PROFILE}


def fuzz_settings(default: int, slow: int, *, force_slow: bool = False) -> settings:
    """Hypothesis settings with `default` examples in CI and `slow` under the slow profile."""
    if force_slow or slow_profile_selected():
        return settings(settings.get_profile(SLOW_PROFILE), max_examples=slow)
    return settings(settings.get_profile(DEFAULT_PROFILE), max_examples=default)


def trials(default: int, slow: int) -> int:
    """Number of kill/resume (or similar) trials in the active profile."""
    return slow if slow_profile_selected() else default


PROFILES = ["default", pytest.param("slow", marks=pytest.mark.slow)]


def fuzz_test(default: int, slow: int, **strategies: Any) -> Callable[[Callable], Callable]:
    """A hypothesis test over `strategies`, as a pytest test parametrized with PROFILES: the "default" case
    runs `default` examples, the "slow" case (marked slow) `slow` examples under the slow profile.

        @fuzz_test(default=200, slow=3000, source=st.text())
        def test_something(source): ...

    Each case builds its own @given test, so both can run in one session.
    """

    def wrap(prop: Callable) -> Callable:
        def test(profile: str) -> None:
            hypothesis_test = given(**strategies)(prop)
            fuzz_settings(default, slow, force_slow=profile == "slow")(hypothesis_test)()

        test.__name__ = test.__qualname__ = prop.__name__
        test.__doc__ = prop.__doc__
        test.__module__ = prop.__module__
        return pytest.mark.parametrize("profile", PROFILES)(test)

    return wrap


# --------------------------------------------------------------------------------------------------
# Counters (written to JSON by the session fixture in conftest.py)
# --------------------------------------------------------------------------------------------------

TRIED: Counter[str] = Counter()
"""Fuzzed inputs tried, per target."""
OUTCOMES: Counter[str] = Counter()
"""Per target: how many ended in a result and how many in an InstructkitError ("<target>:ok" / ":error")."""
BLOCKED: list[dict[str, str]] = []
"""Injection payloads the template sandbox refused or bounded: {"payload", "where", "how"}."""
KILL_TRIALS: list[dict[str, Any]] = []
"""Kill/resume trials: {"kill_after_s", "phase", "resumed_from", "equal"}."""
OTHER_TRIALS: list[dict[str, Any]] = []
"""Other fault-injection trials (corrupt checkpoint, disk space, NaN, lock, loading safety)."""


def tried(target: str, n: int = 1) -> None:
    TRIED[target] += n


def blocked(payload: str, where: str, how: str) -> None:
    BLOCKED.append({"payload": payload[:200], "where": where, "how": how})


def report() -> dict[str, Any]:
    return {
        "inputs_tried": dict(sorted(TRIED.items())),
        "inputs_tried_total": sum(TRIED.values()),
        "outcomes": dict(sorted(OUTCOMES.items())),
        "payloads_blocked": len(BLOCKED),
        "payloads": BLOCKED,
        "kill_resume_trials": KILL_TRIALS,
        "other_fault_trials": OTHER_TRIALS,
        "profile": "slow" if slow_profile_selected() else "default",
    }


# --------------------------------------------------------------------------------------------------
# The acceptable outcomes
# --------------------------------------------------------------------------------------------------


class UnexpectedCrash(AssertionError):
    """A fuzzed input raised something other than an InstructkitError (a bug), or a vague message."""


@contextlib.contextmanager
def expect_clean(target: str, culprits: Iterable[str], data: Any = None, *, count: bool = True) -> Iterator[dict]:
    """Run the block; an InstructkitError must name one of `culprits`, any other exception is a bug.

    Yields a dict whose "error" is set to the InstructkitError when one was raised (the result is the
    caller's to check when there was none). `count=False` for a later stage of an input already counted
    (e.g. rendering a template whose compilation was the counted input): its outcome is still recorded.
    """
    if count:
        tried(target)
    outcome: dict[str, Any] = {"error": None}
    culprits = [c for c in culprits if c]
    try:
        yield outcome
    except InstructkitError as exc:
        OUTCOMES[f"{target}:error"] += 1
        outcome["error"] = exc
        message = str(exc)
        if culprits and not any(c in message or repr(c)[1:-1] in message for c in culprits):
            raise UnexpectedCrash(
                f"{target}: the error message names none of {culprits!r}:\n  {message}\n  input: {data!r:.500}"
            ) from exc
    except Exception as exc:  # noqa: BLE001 - exactly what we are hunting for
        raise UnexpectedCrash(
            f"{target}: {type(exc).__name__} escaped (should be a result or an InstructkitError): {exc}\n"
            f"  input: {data!r:.800}"
        ) from exc
    else:
        OUTCOMES[f"{target}:ok"] += 1


# --------------------------------------------------------------------------------------------------
# Time bound without pytest-timeout (used inside hypothesis examples, where a per-test timeout is too coarse)
# --------------------------------------------------------------------------------------------------


class TookTooLong(AssertionError):
    pass


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """SIGALRM guard: raise TookTooLong when the block runs longer than `seconds` (main thread, Unix)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise TookTooLong(f"{what} ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
