"""A training process that dies from an uncaught exception while gradtel serves: the
exception is counted by its type and scraped before the process is gone, and the
user's traceback and exit status are exactly Python's own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from .conftest import parse, sample, scrape

SCRIPT = textwrap.dedent(
    """
    import sys, torch, gradtel

    model = torch.nn.Linear(4, 1)
    monitor = gradtel.GradMonitor(model)
    server = gradtel.serve(port=0, exit_grace=30)
    print(server.url, flush=True)
    sys.stdin.readline()  # Prometheus has scraped once
    model(torch.ones(1, 4)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    monitor.collect(step=41)
    # As a policy sampling from NaN weights does: torch.distributions raises.
    torch.distributions.Categorical(logits=torch.tensor([float("nan"), 0.0]))
    """
)


def test_a_crash_is_counted_scraped_and_passed_on_unchanged() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stdin is not None
        url = process.stdout.readline().strip()
        scrape(url)
        process.stdin.write("go\n")
        process.stdin.flush()
        deadline, found = time.monotonic() + 60, {}
        while time.monotonic() < deadline:  # the exit wait keeps the endpoint up for this scrape
            found = parse(scrape(url))
            if ("gradtel_training_exceptions_total", frozenset({("type", "ValueError")})) in found:
                break
            time.sleep(0.1)
        assert sample(found, "gradtel_training_exceptions_total", type="ValueError") == 1
        assert sample(found, "gradtel_last_unhealthy_step", kind="nan") == 41
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1
    lines = stderr.splitlines()
    traceback = lines.index("Traceback (most recent call last):")
    error = next(i for i, line in enumerate(lines) if line.startswith("ValueError: Expected parameter logits"))
    assert traceback < error  # Python's own report, whole
